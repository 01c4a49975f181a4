"""Load an item's image: a path, a base64 data URI or an s3 URI; PNG, JPEG or DICOM.

Every failure raises :class:`ImageError` with a message that says what is wrong, so a bad item can
fail alone. DICOM files are recognised by the ``DICM`` prefix after the 128-byte preamble or, for a
file written without preamble and prefix (older raw data sets), by parsing as DICOM with pixel data
(pydicom's ``force=True``) when no image format matches. DICOM: the modality LUT (rescale
slope/intercept), then the VOI window stored in the file (or the full range of the pixel data when
none is stored), MONOCHROME1 inverted, 16-bit data scaled to 8 bits, first frame of a multi-frame file.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

DICOM_MAGIC_OFFSET = 128


class ImageError(ValueError):
    """An image that cannot be used; the message is meant for the user."""


class _NotDicom(ValueError):
    """The bytes do not parse as a DICOM data set with pixel data."""


# Pillow's own bomb guard fires first for images far over ours; its message names its limit, not ours.
_PILLOW_BOMB_SIZE = re.compile(r"Image size \((\d+) pixels\)")


def bomb_message(exc: Exception, max_pixels: int) -> str:
    """The user's message for Pillow's DecompressionBombError: our limit, and the size when Pillow gives it."""
    match = _PILLOW_BOMB_SIZE.search(str(exc))
    size = f"{int(match.group(1))} pixels" if match else "too many pixels"
    return f"image is {size}; the limit is {max_pixels} (decompression-bomb guard)"


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 32 * 1024 * 1024
    max_pixels: int = 40_000_000  # decompression-bomb guard, checked before decoding


def read_reference(ref: str, *, base_dir: str | None = None, max_bytes: int = ImageLimits.max_bytes) -> bytes:
    """The raw bytes behind an image reference."""
    if not isinstance(ref, str) or not ref:
        raise ImageError("image is missing: give a file path, a data: URI or an s3:// URI")
    if ref.startswith("data:"):
        header, _, payload = ref.partition(",")
        if ";base64" not in header:
            raise ImageError("data URI images must be base64 encoded (data:image/png;base64,...)")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ImageError(f"data URI is not valid base64: {exc}") from exc
    elif ref.startswith("s3://"):
        from hscr_client.storage import open_location

        bucket_key = ref[len("s3://"):]
        bucket, _, key = bucket_key.partition("/")
        location = open_location(f"s3://{bucket}")
        try:
            data = location.read_bytes(key)
        except OSError as exc:
            raise ImageError(f"cannot read {ref}: {exc}") from exc
    else:
        path = ref[len("file://"):] if ref.startswith("file://") else ref
        if base_dir and not os.path.isabs(path):
            path = os.path.join(base_dir, path)
        try:
            size = os.path.getsize(path)
            if size > max_bytes:
                raise ImageError(f"image file is {size} bytes; the limit is {max_bytes}")
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise ImageError(f"cannot read image file {ref!r}: {exc.strerror or exc}") from exc
    if len(data) > max_bytes:
        raise ImageError(f"image is {len(data)} bytes; the limit is {max_bytes}")
    if not data:
        raise ImageError("image is empty (0 bytes)")
    return data


def is_dicom(data: bytes) -> bool:
    return data[DICOM_MAGIC_OFFSET:DICOM_MAGIC_OFFSET + 4] == b"DICM"


def decode_image(data: bytes, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Decode PNG/JPEG (any format Pillow reads) or DICOM bytes into an RGB image."""
    if is_dicom(data):
        return _decode_dicom(data, limits)
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
            if width * height > limits.max_pixels:
                raise ImageError(f"image is {width}x{height} = {width * height} pixels; the limit is "
                                 f"{limits.max_pixels} (decompression-bomb guard)")
            probe.load()
            image = probe.convert("RGB")
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(bomb_message(exc, limits.max_pixels)) from exc
    except Image.UnidentifiedImageError as exc:
        try:  # a DICOM file without the preamble and 'DICM' prefix: pydicom still reads it
            return _decode_dicom(data, limits, headerless=True)
        except _NotDicom:
            pass
        raise ImageError("not a readable image: the file format is not recognised (PNG, JPEG or DICOM "
                         "expected)") from exc
    except Exception as exc:  # Pillow raises many types for corrupt data
        raise ImageError(f"not a readable image (corrupt or truncated data): {exc}") from exc
    return image


def _decode_dicom(data: bytes, limits: ImageLimits, *, headerless: bool = False) -> Image.Image:
    """``headerless``: the file lacks the preamble and prefix; raises _NotDicom unless it parses as DICOM with
    pixel data (pydicom's ``force=True`` reads almost any bytes as some data set)."""
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    if headerless:
        try:
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
        except Exception as exc:  # pydicom raises many types for what is not DICOM
            raise _NotDicom(str(exc)) from exc
        if not all(keyword in ds for keyword in ("PixelData", "Rows", "Columns")):
            raise _NotDicom("no image in the data set")
        _name_transfer_syntax(ds)
    try:
        if not headerless:
            ds = pydicom.dcmread(io.BytesIO(data))
        rows, cols = int(ds.Rows), int(ds.Columns)
        if rows * cols > limits.max_pixels:
            raise ImageError(f"DICOM frame is {cols}x{rows} pixels; the limit is {limits.max_pixels}")
        pixels = ds.pixel_array
    except ImageError:
        raise
    except Exception as exc:
        raise ImageError(f"malformed DICOM: {exc}") from exc
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2"))
    if frames > 1:
        pixels = pixels[0]
    if photometric.startswith("MONOCHROME"):
        values = apply_modality_lut(pixels, ds).astype(np.float64)
        if "WindowCenter" in ds and "WindowWidth" in ds:
            values = apply_voi_lut(values, ds, index=0).astype(np.float64)
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
        if photometric == "MONOCHROME1":
            scaled = 1.0 - scaled
        return Image.fromarray((scaled * 255).round().astype(np.uint8), mode="L").convert("RGB")
    try:
        if photometric.startswith("YBR"):
            from pydicom.pixels import convert_color_space

            pixels = convert_color_space(pixels, photometric, "RGB")
        array = np.asarray(pixels)
        if array.dtype != np.uint8:
            array = (array.astype(np.float64) / max(1.0, float(array.max())) * 255).astype(np.uint8)
        return Image.fromarray(array).convert("RGB")
    except Exception as exc:
        raise ImageError(f"unsupported DICOM colour data ({photometric}): {exc}") from exc


def _name_transfer_syntax(ds) -> None:
    """A raw data set (no file meta group) does not name its transfer syntax, which pydicom needs to decode the
    pixels: name the uncompressed one its elements were read in (compressed pixel data always has file meta)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    implicit, little = ds.original_encoding
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                              ExplicitVRLittleEndian if little else ExplicitVRBigEndian)


def load_image(ref: str, *, base_dir: str | None = None, limits: ImageLimits = ImageLimits()) -> Image.Image:
    return decode_image(read_reference(ref, base_dir=base_dir, max_bytes=limits.max_bytes), limits)
