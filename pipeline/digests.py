"""SHA-256 digests, one way each: of a byte stream, of a file, of a folder's visible files.

Every content address in the product comes from here: the registry's artifact digest (checked by
every deploy), the local step cache's keys, the code URIs of the SageMaker definition, the
runner's artifact store, the S3 mirror's folder names. Plain hashlib, no SDK, so the deploy
function (a Lambda zip) carries it too.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable

BLOCK = 1 << 20


def sha256_of(chunks: Iterable[bytes]) -> str:
    """Hex SHA-256 over byte chunks (a file read in blocks, an S3 body stream, a few strings)."""
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def file_chunks(path: str | os.PathLike) -> Iterable[bytes]:
    with open(path, "rb") as f:
        yield from iter(lambda: f.read(BLOCK), b"")


def file_sha256(path: str | os.PathLike) -> str:
    return sha256_of(file_chunks(path))


def visible_files(root: Path) -> list[Path]:
    """Every file a step can read under `root`: symlinked folders followed (a linked photo folder
    is data like any other), hidden files skipped (bookkeeping such as a fetch ledger, which no
    step reads), each real folder walked once (a link loop ends)."""
    found, seen = [], set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(folder) / f for f in files if not f.startswith(".")]
    return sorted(found)


def named_files_sha256(files: Iterable[tuple[str, str | os.PathLike]]) -> str:
    """SHA-256 over (name, bytes) pairs, in the order given: what a set of files holds, named."""
    def chunks():
        for name, path in files:
            yield name.encode() + b"\0"
            yield from file_chunks(path)
            yield b"\0"

    return sha256_of(chunks())


def tree_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a folder's visible files (relative names and bytes), or of one file."""
    path = Path(path)
    if path.is_file():
        return named_files_sha256([(".", path)])
    return named_files_sha256((p.relative_to(path).as_posix(), p) for p in visible_files(path) if p.is_file())
