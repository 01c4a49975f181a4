import base64
import io

import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from hscr_worker.fixture import synthetic
from hscr_worker.fixture.dicom import write_dicom
from hscr_worker.images import ImageError, ImageLimits, decode_image, load_image


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture
def example_image():
    return synthetic.make_examples(1, 21)[0].image


def test_png_jpeg_and_data_uri(tmp_path, example_image):
    (tmp_path / "a.png").write_bytes(png_bytes(example_image))
    (tmp_path / "a.jpg").write_bytes(png_bytes(example_image.convert("RGB"), "JPEG"))
    png = load_image("a.png", base_dir=str(tmp_path))
    jpeg = load_image(str(tmp_path / "a.jpg"))
    assert png.mode == "RGB" and png.size == (64, 64)
    assert np.abs(np.asarray(png, float) - np.asarray(jpeg, float)).mean() < 8  # lossy, but the same picture
    uri = "data:image/png;base64," + base64.b64encode(png_bytes(example_image)).decode()
    assert np.array_equal(np.asarray(load_image(uri)), np.asarray(png))


def test_dicom_windowing_and_monochrome1(tmp_path, example_image):
    mono2 = load_image(str(write_dicom(example_image, tmp_path / "m2.dcm")))
    mono1 = load_image(str(write_dicom(example_image, tmp_path / "m1.dcm", monochrome1=True)))
    grey = np.asarray(example_image.convert("L"), float)
    got = np.asarray(mono2.convert("L"), float)
    assert np.corrcoef(grey.ravel(), got.ravel())[0, 1] > 0.99  # 16-bit -> 8-bit keeps the picture
    assert np.abs(np.asarray(mono1, float) - np.asarray(mono2, float)).mean() < 2  # inverted back


def test_multiframe_dicom_uses_the_first_frame(tmp_path):
    """Three different pictures as the frames of one file: the loaded image is the first one's."""
    import pydicom

    pictures = [e.image.convert("L") for e in synthetic.make_examples(3, 23)]
    frames = []
    for k, picture in enumerate(pictures):  # each frame stored exactly as write_dicom stores a one-frame file
        frames.append(pydicom.dcmread(write_dicom(picture, tmp_path / f"frame{k}.dcm")).pixel_array)
    ds = pydicom.dcmread(tmp_path / "frame0.dcm")
    ds.NumberOfFrames = len(frames)
    ds.PixelData = np.stack(frames).tobytes()
    ds.save_as(tmp_path / "mf.dcm", enforce_file_format=True)

    got = np.asarray(load_image(str(tmp_path / "mf.dcm")).convert("L"), float).ravel()
    greys = [np.asarray(p, float).ravel() for p in pictures]
    assert got.size == 64 * 64
    assert np.corrcoef(greys[0], greys[1])[0, 1] < 0.9 and np.corrcoef(greys[0], greys[2])[0, 1] < 0.9
    assert np.corrcoef(got, greys[0])[0, 1] > 0.99
    assert np.corrcoef(got, greys[1])[0, 1] < 0.9 and np.corrcoef(got, greys[2])[0, 1] < 0.9


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "MR_small_bigendian.dcm"])
def test_real_dicom_test_files(name):
    path = get_testdata_file(name)
    image = load_image(path)
    array = np.asarray(image)
    assert image.mode == "RGB" and array.std() > 10  # a real picture, windowed into 8 bits


def test_bad_inputs_have_clear_errors(tmp_path, example_image):
    (tmp_path / "text.png").write_bytes(b"hello, not an image")
    with pytest.raises(ImageError, match="not recognised"):
        load_image(str(tmp_path / "text.png"))
    truncated = png_bytes(example_image)[:200]
    with pytest.raises(ImageError, match="corrupt|not recognised"):
        decode_image(truncated)
    with pytest.raises(ImageError, match="cannot read image file"):
        load_image(str(tmp_path / "missing.png"))
    with pytest.raises(ImageError, match="base64"):
        load_image("data:image/png;base64,@@@")
    with pytest.raises(ImageError, match="missing"):
        load_image("")
    with pytest.raises(ImageError, match="malformed DICOM"):
        decode_image(b"\0" * 128 + b"DICM" + b"\x02\x00garbage")


def test_decompression_bomb_is_refused_before_decoding():
    bomb = png_bytes(Image.new("L", (8000, 8000)))  # compresses to a few KB, 64 M pixels
    assert len(bomb) < 200_000
    with pytest.raises(ImageError, match="decompression-bomb"):
        decode_image(bomb, ImageLimits(max_pixels=40_000_000))


def test_byte_limit(tmp_path, example_image):
    (tmp_path / "a.png").write_bytes(png_bytes(example_image))
    with pytest.raises(ImageError, match="limit"):
        load_image(str(tmp_path / "a.png"), limits=ImageLimits(max_bytes=100))
