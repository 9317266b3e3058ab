"""The one rule for reading a bin photo: Preprocess, `invmon data fetch`, Evaluate and serving.

Every place that turns bytes into pixels goes through `decode` so that a photo the pipeline
trained on and a photo the endpoint is sent are read the same way:
- only the formats the caller names are decoded (JPEG and PNG; never TIFF, EPS, WEBP, ... that
  Pillow would otherwise pick by sniffing the bytes);
- a pixel budget is checked from the header, before any pixel is decoded (a 100-byte PNG may
  declare 40 megapixels);
- the decode must be complete: a truncated JPEG, or a PNG whose compressed stream ends before
  its last row, is rejected instead of being padded with black;
- EXIF orientation is applied; 16-bit grey, palette, alpha and CMYK become correct 8-bit RGB
  (alpha is composited on white, not dropped).

Only the standard library, Pillow and numpy: it is staged beside preprocess.py, evaluate.py,
train.py and travels in every model artifact as code/photos.py.
"""
from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

FORMATS = ("JPEG", "PNG")
# What each accepted content type lets through (application/x-image is SageMaker's "any image").
CONTENT_TYPE_FORMATS = {
    "image/jpeg": ("JPEG",),
    "image/png": ("PNG",),
    "application/x-image": FORMATS,
}
# ABID photos are well under a megapixel; 16 MP still admits a 4896x3264 camera photo.
MAX_PIXELS = 16_000_000
# Magic numbers, to name what a rejected body really is.
MAGIC = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF8", "GIF"),
         (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"%!PS", "EPS"),
         (b"\xc5\xd0\xd3\xc6", "EPS"), (b"\x00\x00\x00\x0cjP  ", "JPEG2000"),
         (b"\xff\x4f\xff\x51", "JPEG2000"), (b"\x00\x00\x01\x00", "ICO"), (b"%PDF", "PDF"))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel
_SIXTEEN_TO_EIGHT = ((np.arange(65536, dtype=np.uint32) + 128) // 257).astype(np.uint8)


class ImageRejected(ValueError):
    """A photo that cannot be used. `kind` is a short machine-readable class for reports."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


def sniff_format(head: bytes) -> str | None:
    """The image format the first bytes claim, if any."""
    if head[4:12] == b"ftypavif" or head[4:12] == b"ftypheic":
        return "AVIF/HEIC"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "WEBP"
    for magic, name in MAGIC:
        if head.startswith(magic):
            return name
    return None


def _png_row_bytes(width: int, bit_depth: int, channels: int) -> int:
    return 1 + (width * bit_depth * channels + 7) // 8  # one filter byte per row


def png_expected_size(width: int, height: int, bit_depth: int, channels: int,
                      interlaced: bool) -> int:
    """Bytes the PNG's decompressed IDAT stream must hold (PNG spec 8.2, Adam7 passes)."""
    if not interlaced:
        return height * _png_row_bytes(width, bit_depth, channels)
    total = 0
    for x0, y0, dx, dy in ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4),
                           (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)):
        pass_w = (width - x0 + dx - 1) // dx
        pass_h = (height - y0 + dy - 1) // dy
        if pass_w and pass_h:
            total += pass_h * _png_row_bytes(pass_w, bit_depth, channels)
    return total


def check_png_stream(data: bytes) -> None:
    """Reject a PNG whose image data ends before its last row (Pillow pads such a file with
    black and calls it complete). Streams the IDAT data through zlib without keeping it."""
    pos, header, inflater, produced = 8, None, zlib.decompressobj(), 0
    ended = False
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR" and len(chunk) >= 13:
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunk[:13])
            header = (width, height, depth, PNG_CHANNELS.get(colour, 4), interlace == 1)
        elif kind == b"IDAT" and header is not None and not ended:
            expected = png_expected_size(*header)
            try:
                # Count the output in bounded pieces: memory stays flat whatever the stream holds,
                # and stop at the declared size: a stream that inflates to gigabytes of rows
                # nobody reads would otherwise cost seconds of CPU (Pillow stops there too).
                piece = inflater.decompress(chunk, 1 << 20)
                produced += len(piece)
                while inflater.unconsumed_tail and produced < expected:
                    produced += len(inflater.decompress(inflater.unconsumed_tail, 1 << 20))
            except zlib.error as e:
                raise ImageRejected("corrupt", f"corrupt PNG: its image data does not inflate ({e})")
            ended = inflater.eof or produced >= expected
        elif kind == b"IEND":
            break
    if header is None:
        raise ImageRejected("corrupt", "corrupt PNG: no IHDR header")
    expected = png_expected_size(*header)
    if produced < expected:
        raise ImageRejected("truncated", f"truncated PNG: its image data ends after {produced} of "
                                         f"{expected} bytes ({header[0]}x{header[1]} declared)")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any decoded JPEG/PNG mode -> 8-bit RGB, without clipping 16-bit values or dropping alpha."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        # 16-bit grey: scale 0..65535 to 0..255 (convert("L") would clip everything above 255).
        # A 65,536-entry lookup table: one byte a pixel out, no wide temporaries (float64
        # arithmetic cost 8 bytes a pixel, 128 MB at the 16 MP budget).
        values = np.asarray(image)
        if values.dtype != np.uint16:  # mode "I" is int32 (0..65535 in a PNG)
            values = np.clip(values, 0, 65535)
        image = Image.fromarray(_SIXTEEN_TO_EIGHT[values], "L")
    elif image.mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64))
        image = Image.fromarray(np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif image.mode in ("L", "RGB") and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("LA", "La", "PA", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        white = Image.new("RGB", image.size, (255, 255, 255))
        white.paste(image, mask=image.getchannel("A"))
        return white
    return image.convert("RGB")  # L, RGB, CMYK (Adobe inversion handled by Pillow), YCbCr


def decode(source: bytes | str | os.PathLike, formats: tuple[str, ...] = FORMATS,
           max_pixels: int = MAX_PIXELS, min_side: int = 1,
           draft: tuple[int, int] | None = None) -> Image.Image:
    """Bytes or a file -> fully decoded, upright, 8-bit RGB image; ImageRejected otherwise.

    `draft` lets a JPEG decode straight at 1/2, 1/4 or 1/8 scale, never below that size: every
    byte is still decoded (truncation is still caught) for far less work.
    """
    if isinstance(source, (str, os.PathLike)):
        try:
            data = Path(source).read_bytes()
        except OSError as e:
            raise ImageRejected("unreadable", f"cannot read file: {e.strerror or e}") from None
    else:
        data = bytes(source)
    if not data:
        raise ImageRejected("empty", "empty file: zero bytes")
    found = sniff_format(data[:16])
    allowed = " or ".join(formats)
    if found is not None and found not in formats:
        raise ImageRejected("wrong_format", f"the bytes are a {found} image; only {allowed} "
                                            "is accepted here")
    try:
        image = Image.open(io.BytesIO(data), formats=list(formats))
    except UnidentifiedImageError:
        if found in formats:
            raise ImageRejected("corrupt", f"corrupt {found}: its header cannot be decoded") from None
        raise ImageRejected("not_image", f"not an image: the bytes are not {allowed}") from None
    except Image.DecompressionBombError as e:
        raise ImageRejected("too_large", f"too large: {e}") from None
    except Exception as e:  # noqa: BLE001 - a header parser bug must not escape as a crash
        raise ImageRejected("corrupt", f"corrupt {found or 'image'} header: {e}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageRejected("too_large", f"too large: {width}x{height} is over the budget of "
                                         f"{max_pixels:,} pixels")
    if min(width, height) < min_side:
        raise ImageRejected("too_small", f"too small: {width}x{height}, short side < {min_side} px")
    try:
        if image.format == "PNG":
            check_png_stream(data)
        if draft is not None and image.format == "JPEG":
            image.draft("RGB", draft)
        turned = image.getexif().get(0x0112) in (5, 6, 7, 8)  # EXIF: turned by 90 or 270 degrees
        image.load()  # a truncated stream fails here (Pillow's LOAD_TRUNCATED_IMAGES is False)
        rgb = _to_rgb(ImageOps.exif_transpose(image))
        # The photo's own size, upright, before any draft scaling: callers report and resize by it.
        rgb.info["source_size"] = (height, width) if turned else (width, height)
        return rgb
    except ImageRejected:
        raise
    except Image.DecompressionBombError as e:
        raise ImageRejected("too_large", f"too large: {e}") from None
    except (OSError, SyntaxError, ValueError, struct.error) as e:
        kind = "truncated" if "truncated" in str(e) else "corrupt"
        raise ImageRejected(kind, f"{kind} {image.format}: {e}") from None
    except Exception as e:  # noqa: BLE001 - a decoder bug is a bad photo, not a crash
        raise ImageRejected("corrupt", f"unreadable {image.format}: {type(e).__name__}: {e}") from None
    finally:
        image.close()



# What drift monitoring compares between a model's baseline (its test photos, at Evaluate) and the
# photos it serves (docs/monitoring.md): one definition, here beside the decoding rule, so that
# Evaluate, the local endpoint's capture and the monitor measure a photo the same way.
STATISTICS = ("brightness", "contrast", "sharpness", "width", "height")


def statistics(image: Image.Image, side: int) -> dict[str, float]:
    """A decoded photo's brightness and contrast (mean and standard deviation of its luma, 0-1),
    sharpness (the variance of its Laplacian: blur lowers it) and its own width and height.

    Measured on the photo resized to a side x side square (BILINEAR, the whole photo), the view
    the model has of it: the numbers do not depend on the camera's resolution, and a blur that
    the resize hides from the model is hidden from them too. A photo already that size is used
    as it is (the local endpoint resizes photos early, in the same way)."""
    width, height = image.info.get("source_size", image.size)
    if image.size != (side, side):
        image = image.convert("RGB").resize((side, side), Image.BILINEAR)
    luma = np.asarray(image.convert("L"), dtype=np.float32)
    laplacian = (luma[1:-1, :-2] + luma[1:-1, 2:] + luma[:-2, 1:-1] + luma[2:, 1:-1]
                 - 4.0 * luma[1:-1, 1:-1])
    return {"brightness": round(float(luma.mean()) / 255.0, 6),
            "contrast": round(float(luma.std()) / 255.0, 6),
            "sharpness": round(float(laplacian.var()), 4),
            "width": int(width), "height": int(height)}
