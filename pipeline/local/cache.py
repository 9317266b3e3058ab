"""Step caching, as SageMaker does it: a step whose code, arguments and inputs are unchanged
reuses the earlier result instead of running again.

The key hashes the step's code files, its resolved arguments and hyperparameters, and the
content of every input (file names and bytes), so an edited script, a new parameter value or
a changed photo each make a new key.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from steps.base import Code


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


def fingerprint(path: Path) -> str:
    """sha256 over the relative names and bytes of every file under `path` (or of one file)."""
    digest = hashlib.sha256()
    path = Path(path)
    files = [path] if path.is_file() else [p for p in visible_files(path) if p.is_file()]
    for file in files:
        digest.update(file.relative_to(path).as_posix().encode() if file != path else b".")
        digest.update(b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


def code_fingerprint(code: Code) -> str:
    digest = hashlib.sha256()
    for src, name in code.files():
        digest.update(name.encode() + b"\0" + src.read_bytes() + b"\0")
    return digest.hexdigest()


def cache_key(step_name: str, code: Code, settings: dict, inputs: dict[str, str]) -> str:
    payload = json.dumps(
        {"step": step_name, "code": code_fingerprint(code), "settings": settings, "inputs": inputs},
        sort_keys=True, default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def link_tree(src: Path, dst: Path) -> None:
    """Copy a finished step's folder by hard links (no extra disk), falling back to copies."""

    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, symlinks=True, copy_function=link, dirs_exist_ok=True)


class StepCache:
    def __init__(self, root: Path):
        self.root = root

    def _entry(self, step: str, key: str) -> Path:
        return self.root / f"{step}-{key}.json"

    def lookup(self, step: str, key: str) -> dict | None:
        """The cached record, if its step folder still exists."""
        entry = self._entry(step, key)
        if not entry.exists():
            return None
        record = json.loads(entry.read_text())
        return record if Path(record["step_dir"]).is_dir() else None

    def store(self, step: str, key: str, record: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self._entry(step, key).with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(record, indent=2))
        tmp.replace(self._entry(step, key))
