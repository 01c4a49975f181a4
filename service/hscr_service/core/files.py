"""Uploads: items JSONL files and images (PNG, JPEG, DICOM), checked cheaply before they are stored.

The image check reads only the header (Pillow opens lazily; pydicom stops before the pixel data), so a
decompression bomb is refused by its declared size without being decoded. Full decoding happens in the
worker, where a file that passes this check but still fails becomes a per-item error.
"""

from __future__ import annotations

import hashlib
import io
import time
import uuid

from hscr_jobs.store import FileRecord, Store

from .config import Settings
from .errors import InvalidInput, TooLarge
from .storage import Storage

DICOM_MAGIC_OFFSET = 128


def check_image(data: bytes, *, max_pixels: int) -> str:
    """Raise InvalidInput unless ``data`` looks like a usable image; returns its content type."""
    if not data:
        raise InvalidInput("the image is empty (0 bytes)", param="file")
    if data[DICOM_MAGIC_OFFSET:DICOM_MAGIC_OFFSET + 4] == b"DICM":
        import pydicom

        try:
            header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
            rows, cols = int(header.Rows), int(header.Columns)
        except Exception as exc:  # pydicom raises many types for malformed files
            raise InvalidInput(f"malformed DICOM: {exc}", param="file") from exc
        if rows * cols > max_pixels:
            raise InvalidInput(f"DICOM frame is {cols}x{rows} = {rows * cols} pixels; the limit is {max_pixels}",
                               param="file")
        return "application/dicom"
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
            kind = probe.format
    except Image.DecompressionBombError as exc:
        raise InvalidInput(f"image refused as a decompression bomb: {exc}", param="file") from exc
    except Exception as exc:
        raise InvalidInput(f"not a readable image (PNG, JPEG or DICOM expected): {exc}", param="file") from exc
    if width * height > max_pixels:
        raise InvalidInput(f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels} "
                           "(decompression-bomb guard)", param="file")
    return f"image/{(kind or 'octet-stream').lower()}"


def store_upload(*, tenant: str, filename: str, purpose: str, data: bytes, store: Store, storage: Storage,
                 settings: Settings) -> FileRecord:
    if purpose == "image":
        if len(data) > settings.max_image_bytes:
            raise TooLarge(f"image is {len(data)} bytes; the limit is {settings.max_image_bytes}", param="file")
        content_type = check_image(data, max_pixels=settings.max_image_pixels)
    else:
        if len(data) > settings.max_items_file_bytes:
            raise TooLarge(f"items file is {len(data)} bytes; the limit is {settings.max_items_file_bytes}",
                           param="file")
        if not data.strip():
            raise InvalidInput("the items file is empty", param="file")
        content_type = "application/jsonl"
    file_id = "file-" + uuid.uuid4().hex
    record = FileRecord(id=file_id, tenant=tenant, filename=filename[:255] or "upload", purpose=purpose,
                        bytes=len(data), created_at=int(time.time()), uri=storage.file_uri(tenant, file_id),
                        content_type=content_type, sha256=hashlib.sha256(data).hexdigest())
    storage.write(record.uri, data)
    store.add_file(record)
    return record
