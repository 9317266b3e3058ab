"""An ABID-layout S3 bucket for tests: real photos (the ABID sample when present, generated
otherwise), metadata generated from the counts, and every kind of damaged file injected."""
from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import ABID_SAMPLE

BUCKET = "abid-test"
PREFIX = "abid/"


def generated_jpeg(seed: int, size=(96, 80)) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def png_declaring(width: int, height: int, rows: int = 1) -> bytes:
    """A tiny PNG whose header declares width x height RGBA but whose data ends after `rows`."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + bytes(width * 4) for _ in range(rows))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def good_photos(per_count: int) -> dict[str, tuple[bytes, int]]:
    """{id: (jpeg bytes, count)}: real ABID photos when the sample is here, generated otherwise."""
    found: dict[str, tuple[bytes, int]] = {}
    for count in range(1, 6):
        folder = ABID_SAMPLE / str(count)
        files = sorted(folder.glob("*.jpg"))[:per_count] if folder.is_dir() else []
        for i in range(per_count):
            if i < len(files):
                found[files[i].stem] = (files[i].read_bytes(), count)
            else:
                found[f"9{count}{i:03d}"] = (generated_jpeg(count * 1000 + i), count)
    return found


def metadata(count) -> bytes:
    return json.dumps({"BIN_FCSKU_DATA": {}, "EXPECTED_QUANTITY": count}).encode()


def bucket_objects(per_count: int = 4) -> tuple[dict[str, bytes], dict[str, list[str]], dict]:
    """(objects by key, manifest in file_list.json form, the problems the report must name)."""
    objects: dict[str, bytes] = {}
    manifest: dict[str, list[str]] = {str(c): [] for c in range(1, 6)}
    good = good_photos(per_count)

    def add(image_id: str, count: int, image: bytes | None, meta: bytes | None, listed=True):
        if image is not None:
            objects[f"{PREFIX}bin-images/{image_id}.jpg"] = image
        if meta is not None:
            objects[f"{PREFIX}metadata/{image_id}.json"] = meta
        if listed:
            manifest[str(count)].append(f"data/metadata/{image_id}.json")

    for image_id, (data, count) in good.items():
        add(image_id, count, data, metadata(count))
    some = next(iter(good.values()))[0]
    expected = {
        ("x_corrupt", "bin-images/x_corrupt.jpg"): "corrupt",
        ("x_trunc", "bin-images/x_trunc.jpg"): "truncated",
        ("x_zero", "bin-images/x_zero.jpg"): "zero_byte",
        ("x_nometa", "metadata/x_nometa.json"): "unlabelled",
        ("x_mismatch", "metadata/x_mismatch.json"): "label_mismatch",
        ("x_missing", "bin-images/x_missing.jpg"): "missing",
        ("x_missing", "metadata/x_missing.json"): "unlabelled",
        ("x_deep", "metadata/x_deep.json"): "unlabelled",
        ("x_hugeint", "metadata/x_hugeint.json"): "unlabelled",
        ("x_pngbomb", "bin-images/x_pngbomb.jpg"): "too_large",
        ("x_pngshort", "bin-images/x_pngshort.jpg"): "truncated",
    }
    add("x_corrupt", 2, b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8, metadata(2))
    add("x_trunc", 2, some[: len(some) // 2], metadata(2))
    add("x_zero", 3, b"", metadata(3))
    add("x_nometa", 3, generated_jpeg(7), None)
    add("x_mismatch", 3, generated_jpeg(8), metadata(2))
    add("x_missing", 4, None, None)
    add("x_deep", 4, generated_jpeg(9), b"[" * 100_000 + b"]" * 100_000)
    add("x_hugeint", 4, generated_jpeg(10), b'{"EXPECTED_QUANTITY": ' + b"7" * 5000 + b"}")
    add("x_pngbomb", 1, png_declaring(6324, 6324), metadata(1))
    add("x_pngshort", 1, png_declaring(600, 500, rows=3), metadata(1))
    # The same photo under two ids (same count): a duplicate group, not a problem.
    dup_bytes = generated_jpeg(11)
    add("x_dup_a", 5, dup_bytes, metadata(5))
    add("x_dup_b", 5, dup_bytes, metadata(5))
    # Objects the manifest does not list: never read.
    add("y_unlisted", 1, generated_jpeg(12), metadata(1), listed=False)
    return objects, manifest, {"problems": expected, "duplicates": [["x_dup_a", "x_dup_b"]],
                               "good": good}


def fill_bucket(s3, objects: dict[str, bytes]) -> None:
    """The bucket, readable by anyone (like the public ABID bucket), holding `objects`."""
    s3.create_bucket(Bucket=BUCKET)
    s3.put_bucket_policy(Bucket=BUCKET, Policy=json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": "*", "Action": ["s3:GetObject", "s3:ListBucket"],
         "Resource": [f"arn:aws:s3:::{BUCKET}", f"arn:aws:s3:::{BUCKET}/*"]}]}))
    for key, data in objects.items():
        s3.put_object(Bucket=BUCKET, Key=key, Body=data)


def write_manifest(path: Path, manifest: dict) -> Path:
    path.write_text(json.dumps(manifest))
    return path


def mirror_bytes(root: Path) -> dict[str, bytes]:
    """Every visible file of a mirror (the ledger and report aside), by relative path."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith(".") and p.name != "fetch_report.json"}
