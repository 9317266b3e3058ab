"""The one image-decoding rule (scripts/inference/photos.py) against the attacks of issue 9.

Every photo here is made by the test (Pillow or bytes written by hand): none of these need the
real ABID sample.
"""
from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image

from conftest import import_script

photos = import_script("inference", "photos")
inference = import_script("inference", "inference")

ALL_TYPES = tuple(photos.CONTENT_TYPE_FORMATS)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_by_hand(width: int, height: int, idat: bytes, colour: int = 6, depth: int = 8) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (photos.PNG_SIGNATURE + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat)
            + png_chunk(b"IEND", b""))


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def photo(size=(48, 32)) -> Image.Image:
    """A small picture with structure (a gradient and a block), so orientation is visible."""
    w, h = size
    pixels = np.zeros((h, w, 3), np.uint8)
    pixels[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    pixels[: h // 4, : w // 4] = (0, 0, 255)  # blue block in the top-left corner
    return Image.fromarray(pixels, "RGB")


def test_public_api_is_what_preprocess_and_fetch_build_on():
    assert photos.FORMATS == ("JPEG", "PNG")
    assert photos.CONTENT_TYPE_FORMATS == {"image/jpeg": ("JPEG",), "image/png": ("PNG",),
                                           "application/x-image": ("JPEG", "PNG")}
    assert photos.MAX_PIXELS == 16_000_000
    error = photos.ImageRejected("corrupt", "why")
    assert isinstance(error, ValueError) and (error.kind, error.reason) == ("corrupt", "why")
    assert photos.sniff_format(b"\x89PNG\r\n\x1a\n....") == "PNG"


# --------------------------------------------------------------------------- bombs


def test_the_100_byte_png_declaring_6324x6324_that_ends_after_one_row():
    row = b"\x00" + b"\x00" * (6324 * 4)  # one filter byte, one RGBA row
    bomb = png_by_hand(6324, 6324, zlib.compress(row, 9))
    assert len(bomb) <= 120
    started = time.perf_counter()
    with pytest.raises(photos.ImageRejected) as caught:
        photos.decode(bomb)
    assert time.perf_counter() - started < 0.2  # refused from the header, nothing decoded
    assert caught.value.kind == "too_large" and "6324x6324" in caught.value.reason


def test_a_png_within_budget_that_ends_after_one_row_is_truncated_not_padded():
    row = b"\x00" + b"\x7f" * (3000 * 4)
    short = png_by_hand(3000, 3000, zlib.compress(row, 9))
    started = time.perf_counter()
    with pytest.raises(photos.ImageRejected) as caught:
        photos.decode(short)
    assert time.perf_counter() - started < 0.5
    assert caught.value.kind == "truncated" and "3000x3000" in caught.value.reason


def test_a_png_stream_that_inflates_far_past_its_rows_is_not_inflated_to_the_end():
    """100x100 RGB needs 30,100 bytes; this stream inflates to 256 MB. Only the rows count."""
    packer = zlib.compressobj(9)
    rows = b"".join(b"\x00" + bytes(range(100)) * 3 for _ in range(100))
    zeros = bytes(1 << 20)
    idat = packer.compress(rows) + b"".join(packer.compress(zeros) for _ in range(256))
    idat += packer.flush()
    bomb = png_by_hand(100, 100, idat, colour=2)
    started = time.perf_counter()
    inflater, produced = zlib.decompressobj(), 0
    produced += len(inflater.decompress(idat, 1 << 20))
    while inflater.unconsumed_tail:
        produced += len(inflater.decompress(inflater.unconsumed_tail, 1 << 20))
    full_inflate = time.perf_counter() - started
    assert produced == len(rows) + 256 * len(zeros)
    started = time.perf_counter()
    image = photos.decode(bomb)
    assert image.size == (100, 100)
    assert time.perf_counter() - started < max(full_inflate / 3, 0.05)


def jpeg_declaring(width: int, height: int) -> bytes:
    """A real small JPEG whose frame header (SOF0) is rewritten to declare width x height."""
    data = bytearray(encode(photo((16, 16)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@pytest.mark.parametrize("content_type", ["image/jpeg", "application/x-image"])
def test_a_jpeg_declaring_65000x65000_is_refused_before_decoding(content_type):
    started = time.perf_counter()
    with pytest.raises(inference.InvalidInput, match="too large"):
        inference.input_fn(jpeg_declaring(65000, 65000), content_type)
    assert time.perf_counter() - started < 0.2


def test_a_png_bomb_of_64_megapixels_in_a_few_kilobytes():
    bomb = encode(Image.new("1", (8000, 8000)), "PNG")
    assert len(bomb) < 20_000
    with pytest.raises(photos.ImageRejected, match="8000x8000 is over the budget") as caught:
        photos.decode(bomb)
    assert caught.value.kind == "too_large"


# --------------------------------------------------------------------------- formats


def every_pillow_format() -> dict[str, bytes]:
    """One small file in each format Pillow can write, plus hand-made heads of read-only ones."""
    Image.init()  # load every plugin: Image.SAVE is filled lazily
    made = {}
    image = photo((32, 32))
    for fmt in sorted(Image.SAVE):
        if fmt in ("JPEG", "PNG"):
            continue
        for candidate in (image, image.convert("L"), image.convert("1"), image.convert("P")):
            try:
                data = encode(candidate, fmt)
            except Exception:  # noqa: BLE001 - a writer that wants another mode or a library
                continue
            if data:
                made[fmt] = data
                break
    made["PSD(head)"] = b"8BPS\x00\x01" + bytes(6) + struct.pack(">HIIHH", 3, 32, 32, 8, 3)
    made["EPS(text)"] = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\nshowpage\n"
    made["EPS(dos)"] = b"\xc5\xd0\xd3\xc6" + struct.pack("<IIII", 32, 40, 0, 0) + made["EPS(text)"]
    made["HEIC(head)"] = b"\x00\x00\x00\x18ftypheic" + bytes(12)
    return made


OTHER_FORMATS = every_pillow_format()


def test_the_catalogue_covers_pillows_formats():
    # A guard against a Pillow without writers: the formats named in the issue are all here.
    for fmt in ("BMP", "GIF", "TIFF", "WEBP", "JPEG2000", "ICO", "EPS", "PDF", "PPM", "TGA"):
        assert fmt in OTHER_FORMATS, sorted(OTHER_FORMATS)


@pytest.mark.parametrize("fmt", sorted(OTHER_FORMATS))
@pytest.mark.parametrize("content_type", ALL_TYPES)
def test_every_other_pillow_format_is_refused_under_every_image_type(fmt, content_type, monkeypatch):
    def no_ghostscript(*args, **kwargs):
        raise AssertionError("EPS reached Ghostscript")

    # EPS must never even be parsed: its plugin hands the body to Ghostscript to rasterise it.
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", no_ghostscript)
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", no_ghostscript)
    data = OTHER_FORMATS[fmt]
    if fmt == "MPO" and "JPEG" in photos.CONTENT_TYPE_FORMATS[content_type]:
        # An MPO file is a JPEG with more frames after the first: a JPEG to every JPEG reader.
        assert inference.input_fn(data, content_type).size == (32, 32)
        return
    with pytest.raises(inference.InvalidInput) as caught:
        inference.input_fn(data, content_type)
    sniffed = photos.sniff_format(data[:16])
    if sniffed:  # the error names what the bytes really are
        assert sniffed in str(caught.value)


def test_a_png_sent_as_jpeg_and_a_jpeg_sent_as_png_are_refused():
    png, jpeg = encode(photo(), "PNG"), encode(photo(), "JPEG")
    with pytest.raises(inference.InvalidInput, match="PNG image; only JPEG"):
        inference.input_fn(png, "image/jpeg")
    with pytest.raises(inference.InvalidInput, match="JPEG image; only PNG"):
        inference.input_fn(jpeg, "image/png")
    assert inference.input_fn(png, "application/x-image").size == (48, 32)
    assert inference.input_fn(jpeg, "application/x-image").size == (48, 32)


def test_a_truncated_jpeg_is_refused():
    jpeg = encode(photo((200, 200)), "JPEG", quality=95)
    with pytest.raises(photos.ImageRejected) as caught:
        photos.decode(jpeg[: len(jpeg) // 2])
    assert caught.value.kind in ("truncated", "corrupt")


# --------------------------------------------------------------------------- pixel values


def test_16_bit_grey_png_is_scaled_not_clipped():
    values = np.array([[0, 257 * 64, 32768, 65535]], np.uint16).repeat(4, axis=0)
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")  # really a 16-bit file
    rgb = np.asarray(photos.decode(data))
    assert rgb.shape == (4, 4, 3)
    assert rgb[0, :, 0].tolist() == [0, 64, 128, 255]  # convert("L") would give 0, 255, 255, 255
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()


def test_alpha_is_composited_on_white_not_dropped():
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[:, 0] = (255, 0, 0, 0)      # fully transparent red -> white
    rgba[:, 1] = (0, 0, 255, 255)    # opaque blue stays blue
    rgba[:, 2] = (0, 0, 0, 128)      # half-transparent black -> mid grey
    rgb = np.asarray(photos.decode(encode(Image.fromarray(rgba, "RGBA"), "PNG")))
    assert rgb[0, 0].tolist() == [255, 255, 255]
    assert rgb[0, 1].tolist() == [0, 0, 255]
    assert 120 <= rgb[0, 2, 0] <= 135
    grey_alpha = Image.fromarray(rgba[..., 3], "L").convert("LA")
    grey_alpha.putalpha(Image.fromarray(rgba[..., 3]))
    assert np.asarray(photos.decode(encode(grey_alpha, "PNG")))[0, 0].tolist() == [255, 255, 255]
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255])
    palette.putpixel((1, 0), 1)
    decoded = np.asarray(photos.decode(encode(palette, "PNG", transparency=0)))
    assert decoded[0].tolist() == [[255, 255, 255], [0, 0, 255]]  # index 0 is transparent


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_is_applied_when_serving(fmt):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    data = encode(photo((48, 32)), fmt, exif=exif.tobytes())
    upright = inference.input_fn(data, "application/x-image")
    assert upright.size == (32, 48)
    pixels = np.asarray(upright)
    # The blue block, top-left as stored, is top-right once turned clockwise.
    assert pixels[2, -3, 2] > 200 and pixels[2, -3, 0] < 60
    assert pixels[2, 2, 2] < 100


def test_cmyk_jpeg_becomes_rgb():
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    rgb = np.asarray(photos.decode(encode(cmyk, "JPEG", quality=100)))
    assert rgb.shape == (16, 16, 3)
    r, g, b = rgb[8, 8].tolist()
    assert r > 200 and g < 60 and b < 60
