"""What the smoke test sends: held-out photos with Evaluate's answer for each, and malformed requests.

Photos: the test split Preprocess wrote (<count>/<id>.jpg) and the predictions Evaluate made for
the same files (predictions.csv: path,label,prediction,...). Per count, the photos sorted by name
are shuffled with a seeded generator and the first N are taken: the same photos for the same split
and seed, on every back-end.

Malformed requests, built from one of those photos with the standard library alone: an empty body,
a photo declared as text, a PNG declared as JPEG, a JPEG cut in the middle of its scan, and a JPEG
whose header declares 65535x65535 pixels. Each must be refused with a 4xx and a JSON error.
"""
from __future__ import annotations

import csv
import random
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

COUNTS = (1, 2, 3, 4, 5)
CONTENT_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png"}
PREDICTIONS = "predictions.csv"


class SmokeInputError(Exception):
    """The step's inputs cannot make a smoke test (a missing split or predictions file)."""


@dataclass(frozen=True)
class Photo:
    path: str  # "<count>/<file>", as predictions.csv names it
    file: Path
    label: int
    expected: int  # Evaluate's prediction for it

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.file.suffix.lower()]


@dataclass(frozen=True)
class Malformed:
    name: str
    body: bytes
    content_type: str


def read_predictions(where: Path) -> dict[str, int]:
    """predictions.csv (or the folder holding it) -> {path: predicted count}."""
    file = where / PREDICTIONS if where.is_dir() else where
    if not file.is_file():
        raise SmokeInputError(f"no {PREDICTIONS} at {where}: the Evaluate step writes it beside evaluation.json")
    with open(file, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"path", "prediction"} <= set(rows[0]):
        raise SmokeInputError(f"{file} has no path,prediction rows")
    try:
        return {row["path"]: int(row["prediction"]) for row in rows}
    except ValueError as exc:
        raise SmokeInputError(f"{file}: a prediction is not a whole number ({exc})") from None


def select_photos(test: Path, predictions: dict[str, int], per_count: int, seed: int) -> list[Photo]:
    """Up to `per_count` photos of each count, the same ones for the same split and seed."""
    if not test.is_dir():
        raise SmokeInputError(f"--test {test}: no such folder (the test split: <count>/<id>.jpg)")
    chosen: list[Photo] = []
    for count in COUNTS:
        folder = test / str(count)
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in CONTENT_TYPES
                       and not p.name.startswith(".")) if folder.is_dir() else []
        # One generator per count: a count with more photos never changes another count's pick.
        random.Random(f"smoke-{seed}-{count}").shuffle(files)
        for file in files[:per_count]:
            path = f"{count}/{file.name}"
            if path not in predictions:
                raise SmokeInputError(f"Evaluate made no prediction for {path}: the split and "
                                      f"{PREDICTIONS} come from different runs")
            chosen.append(Photo(path, file, count, predictions[path]))
    if not chosen:
        raise SmokeInputError(f"--test {test}: no photos in count folders 1-5")
    return chosen


def tiny_png() -> bytes:
    """A valid 1x1 grey PNG."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00\x80"))
            + chunk(b"IEND", b""))


def _segments(jpeg: bytes):
    """(marker, offset of the marker) of each JPEG header segment, up to the start of scan."""
    pos = 2
    while pos + 4 <= len(jpeg) and jpeg[pos] == 0xFF:
        marker = jpeg[pos + 1]
        yield marker, pos
        if marker == 0xDA:  # start of scan: entropy-coded data follows
            return
        pos += 2 + struct.unpack(">H", jpeg[pos + 2:pos + 4])[0]


def truncated(jpeg: bytes) -> bytes:
    """The photo cut halfway through its scan data: headers whole, pixels missing."""
    scan = next((pos for marker, pos in _segments(jpeg) if marker == 0xDA), len(jpeg) // 2)
    return jpeg[:scan + (len(jpeg) - scan) // 2]


def declared_huge(jpeg: bytes, side: int = 65535) -> bytes:
    """The photo with its frame header claiming side x side pixels (4.3 gigapixels at 65535)."""
    for marker, pos in _segments(jpeg):
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a start-of-frame
            return jpeg[:pos + 5] + struct.pack(">HH", side, side) + jpeg[pos + 9:]
    raise SmokeInputError("no JPEG frame header to enlarge in the chosen photo")


def malformed_requests(jpeg: bytes) -> list[Malformed]:
    if not jpeg.startswith(b"\xff\xd8"):
        raise SmokeInputError("the malformed requests are built from a JPEG photo of the test split")
    return [
        Malformed("empty body", b"", "image/jpeg"),
        Malformed("wrong content type", jpeg, "text/plain"),
        Malformed("PNG declared as JPEG", tiny_png(), "image/jpeg"),
        Malformed("truncated JPEG", truncated(jpeg), "image/jpeg"),
        Malformed("huge declared image", declared_huge(jpeg), "image/jpeg"),
    ]
