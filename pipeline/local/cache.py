"""Step caching, as SageMaker does it: a step whose code, arguments and inputs are unchanged
reuses the earlier result instead of running again.

The key hashes the step's code files, its resolved arguments and hyperparameters, and the
content of every input (file names and bytes), so an edited script, a new parameter value or
a changed photo each make a new key.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from pipeline.digests import named_files_sha256, sha256_of
from steps.base import Code


def code_fingerprint(code: Code) -> str:
    return named_files_sha256((name, src) for src, name in code.files())


def cache_key(step_name: str, code: Code, settings: dict, inputs: dict[str, str]) -> str:
    payload = json.dumps(
        {"step": step_name, "code": code_fingerprint(code), "settings": settings, "inputs": inputs},
        sort_keys=True, default=str,
    )
    return sha256_of([payload.encode()])[:24]


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
