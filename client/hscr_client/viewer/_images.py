"""Small PNG thumbnails of dataset images, for embedding in the viewer page."""

from __future__ import annotations

import base64
import io

DEFAULT_THUMB_SIDE = 128


def thumbnail_png(data: bytes, max_side: int = DEFAULT_THUMB_SIDE) -> bytes | None:
    """A PNG of at most ``max_side`` pixels a side, grayscale when the image is; None if unreadable.

    The original bytes are kept when they are already a PNG within the size and no larger, so
    small images pass through untouched.
    """
    from PIL import Image, ImageChops, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as opened:
            image = opened.copy()
            source_format = opened.format
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return None
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    if image.mode == "RGB":
        red, green, blue = image.split()
        if ImageChops.difference(red, green).getbbox() is None and ImageChops.difference(red, blue).getbbox() is None:
            image = red  # a gray image stored as RGB: one band is lossless and about half the size
    image.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    encoded = buffer.getvalue()
    fits = max(opened.size) <= max_side
    if source_format == "PNG" and fits and len(data) <= len(encoded):
        return data
    return encoded


def thumbnail_b64(data: bytes | None, max_side: int = DEFAULT_THUMB_SIDE) -> str | None:
    """``thumbnail_png`` as base64 text (the payload of a ``data:image/png;base64,`` URI)."""
    if not data:
        return None
    png = thumbnail_png(data, max_side)
    return base64.b64encode(png).decode("ascii") if png else None
