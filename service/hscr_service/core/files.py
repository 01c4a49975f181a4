"""Uploads: items JSONL files and images (PNG, JPEG, DICOM), checked cheaply before they are stored.

An upload arrives spooled to a temporary file (Starlette's multipart parser; the request body is capped by
``api.edge.BodyLimit``); it is checked there, then copied to storage in blocks, never held whole in memory.
The image check reads only the header (Pillow opens lazily; pydicom defers large values), so a
decompression bomb is refused by its declared size without being decoded. Full decoding happens in the
worker, where a file that passes this check but still fails becomes a per-item error.
"""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from collections.abc import Iterator
from typing import BinaryIO

from hscr_jobs.store import FileRecord, Store

from .config import Settings
from .errors import InvalidInput, TooLarge
from .storage import Storage

DICOM_MAGIC_OFFSET = 128


BLOCK_BYTES = 1024 * 1024
# Pillow's own bomb guard fires first for images far over ours; its message names its limit, not ours.
_PILLOW_BOMB_SIZE = re.compile(r"Image size \((\d+) pixels\)")


def _pixels_over(max_pixels: int, width: int, height: int) -> None:
    if width * height > max_pixels:
        raise InvalidInput(f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels} "
                           "(HSCR_MAX_IMAGE_PIXELS, a decompression-bomb guard)", param="file")


def _dicom_content_type(upload: BinaryIO, *, max_pixels: int, headerless: bool) -> str | None:
    """The content type of a DICOM upload; None when a ``headerless`` file (no preamble and 'DICM' prefix) does
    not parse as a DICOM data set with pixel data (pydicom's ``force=True`` reads almost anything as some)."""
    import pydicom

    upload.seek(0)
    try:
        # defer_size: large values (the pixel data) are not read, only noted.
        header = pydicom.dcmread(upload, force=headerless, defer_size=1024, stop_before_pixels=not headerless)
        if headerless and not all(keyword in header for keyword in ("PixelData", "Rows", "Columns")):
            return None
        rows, cols = int(header.Rows), int(header.Columns)
    except Exception as exc:  # pydicom raises many types for malformed files
        if headerless:
            return None
        raise InvalidInput(f"malformed DICOM: {exc}", param="file") from exc
    _pixels_over(max_pixels, cols, rows)
    return "application/dicom"


def check_image(upload: BinaryIO, *, max_pixels: int) -> str:
    """Raise InvalidInput unless the seekable ``upload`` looks like a usable image; returns its content type."""
    upload.seek(0)
    start = upload.read(132)
    if not start:
        raise InvalidInput("the image is empty (0 bytes)", param="file")
    if start[DICOM_MAGIC_OFFSET:DICOM_MAGIC_OFFSET + 4] == b"DICM":
        return _dicom_content_type(upload, max_pixels=max_pixels, headerless=False)
    from PIL import Image

    upload.seek(0)
    try:
        with Image.open(upload) as probe:
            width, height = probe.size
            kind = probe.format
    except Image.DecompressionBombError as exc:
        match = _PILLOW_BOMB_SIZE.search(str(exc))
        size = f"{int(match.group(1))} pixels" if match else "too many pixels"
        raise InvalidInput(f"image is {size}; the limit is {max_pixels} (HSCR_MAX_IMAGE_PIXELS, a "
                           "decompression-bomb guard)", param="file") from exc
    except Exception as exc:
        # A DICOM file written without the preamble and prefix: accepted when it parses to an image.
        content_type = _dicom_content_type(upload, max_pixels=max_pixels, headerless=True)
        if content_type is not None:
            return content_type
        raise InvalidInput(f"not a readable image (PNG, JPEG or DICOM expected): {exc}", param="file") from exc
    _pixels_over(max_pixels, width, height)
    return f"image/{(kind or 'octet-stream').lower()}"


def _has_content(upload: BinaryIO) -> bool:
    """Whether the upload holds anything but whitespace (read in blocks: it may be large)."""
    upload.seek(0)
    while block := upload.read(BLOCK_BYTES):
        if block.strip():
            return True
    return False


def _blocks(upload: BinaryIO, digest) -> Iterator[bytes]:
    upload.seek(0)
    while block := upload.read(BLOCK_BYTES):
        digest.update(block)
        yield block


def upload_limit(purpose: str, settings: Settings) -> tuple[int, str]:
    """(bytes, the setting that raises it) of an upload of ``purpose``."""
    if purpose == "image":
        return settings.max_image_bytes, "HSCR_MAX_IMAGE_BYTES"
    return settings.max_items_file_bytes, "HSCR_MAX_ITEMS_FILE_BYTES"


def store_upload(*, tenant: str, filename: str, purpose: str, upload: BinaryIO, size: int, store: Store,
                 storage: Storage, settings: Settings) -> FileRecord:
    """Check an upload (``size`` bytes in the seekable ``upload``), copy it to storage in blocks, record it."""
    limit, setting = upload_limit(purpose, settings)
    if size > limit:
        raise TooLarge(f"the file is {size} bytes; the limit for purpose {purpose!r} is {limit} bytes ({setting})",
                       param="file")
    if purpose == "image":
        content_type = check_image(upload, max_pixels=settings.max_image_pixels)
    else:
        if not _has_content(upload):
            raise InvalidInput("the items file is empty: give one JSON object per line", param="file")
        content_type = "application/jsonl"
    file_id = "file-" + uuid.uuid4().hex
    uri = storage.file_uri(tenant, file_id)
    digest = hashlib.sha256()
    storage.location.write_stream(storage.relative(uri), _blocks(upload, digest))
    record = FileRecord(id=file_id, tenant=tenant, filename=filename[:255] or "upload", purpose=purpose,
                        bytes=size, created_at=int(time.time()), uri=uri, content_type=content_type,
                        sha256=digest.hexdigest())
    store.add_file(record)
    return record
