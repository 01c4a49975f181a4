"""Messages of refused images and items name our limits and say what to fix; a DICOM file without its
128-byte preamble loads like any other (issue #16, item 8)."""

from __future__ import annotations

import io
import struct
import zlib

import pytest

from hscr_worker.generate import prepare
from hscr_worker.images import ImageError, ImageLimits, decode_image

PILLOW_BOMB_LIMIT = "178956970"  # Pillow's own guard (2 x Image.MAX_IMAGE_PIXELS), which fires before ours


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` and holds no pixel data: what a bomb's header says."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IEND", b""))


def ct_small() -> bytes:
    from pydicom.data import get_testdata_file

    return open(get_testdata_file("CT_small.dcm"), "rb").read()


def test_png_bomb_far_over_pillows_limit_cites_ours():
    limits = ImageLimits(max_pixels=40_000_000)
    with pytest.raises(ImageError) as refused:
        decode_image(png_header(20_000, 20_000), limits)  # 400 M pixels: Pillow refuses it while opening
    message = str(refused.value)
    assert "the limit is 40000000 (" in message and "400000000 pixels" in message, message
    assert PILLOW_BOMB_LIMIT not in message, message


def test_png_bomb_under_pillows_limit_cites_ours():
    with pytest.raises(ImageError, match="the limit is 40000000"):
        decode_image(png_header(8_000, 8_000), ImageLimits(max_pixels=40_000_000))


@pytest.mark.parametrize("strip", ["preamble and prefix", "file meta too"])
def test_dicom_without_preamble_loads(strip):
    import pydicom

    full = ct_small()
    if strip == "preamble and prefix":
        data = full[132:]  # the file meta group starts right away
    else:  # a raw data set: no preamble, no prefix, no file meta group
        dataset = pydicom.dcmread(io.BytesIO(full))
        dataset.preamble = None
        del dataset.file_meta
        buffer = io.BytesIO()
        pydicom.dcmwrite(buffer, dataset, enforce_file_format=False, implicit_vr=True, little_endian=True)
        data = buffer.getvalue()
    assert data[128:132] != b"DICM"
    image = decode_image(data)
    assert image.size == decode_image(full).size == (128, 128)
    assert image.getextrema() == decode_image(full).getextrema()


@pytest.mark.parametrize("data", [b"just some text, not pixels\n" * 4, b"\x00" * 300, b"GIF8" + b"\x01" * 64])
def test_bytes_that_only_force_parse_as_dicom_stay_unreadable(data):
    # pydicom's force=True reads almost anything as some data set; without pixel data it is not an image.
    with pytest.raises(ImageError, match="not a readable image"):
        decode_image(data)


@pytest.mark.parametrize("question, message", [
    (5, "question must be a string, not a number"),
    (["what", "is"], "question must be a string, not an array"),
    ({"text": "q"}, "question must be a string, not an object"),
    (True, "question must be a string, not a boolean"),
    (None, "question is missing"),
    ("   ", "question is empty"),
    ("<image>", "question is empty"),
])
def test_question_messages_say_what_is_wrong(question, message):
    item = {"custom_id": "q", "image": "data:image/png;base64,AA==", "question": question}
    with pytest.raises(ValueError) as refused:
        prepare(item, base_dir=None, limits=ImageLimits())
    assert message in str(refused.value)


def test_non_string_answer_says_it_must_be_a_string():
    item = {"custom_id": "a", "image": "data:image/png;base64,AA==", "question": "q", "answer": 3}
    with pytest.raises(ValueError, match="answer, when given, must be a string, not a number"):
        prepare(item, base_dir=None, limits=ImageLimits())
