"""Real ABID on this machine: `invmon data fetch` and the runner's mirror of `--data s3://...`.

Both run the Preprocess container's own code (scripts/preprocess/ingest.py and s3fetch.py), so
a photo reaches a local run, a mirror and the SageMaker step through one reader and one checker.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

from pipeline.digests import file_sha256, sha256_of
from steps.base import SCRIPTS


def ingest() -> ModuleType:
    """scripts/preprocess/ingest.py by its plain name, as its container imports it: `make env`
    lists the step folders in the environment (invmon-step-code.pth)."""
    try:
        import ingest as module
    except ImportError as exc:
        raise ImportError(f"the Preprocess container's code is not importable ({exc}): "
                          "run `make env`, which installs the step folders' path") from None
    if Path(module.__file__).resolve().parent != (SCRIPTS / "preprocess").resolve():
        raise ImportError(f"`ingest` resolves to {module.__file__}, not scripts/preprocess: run `make env`")
    return module


def mirror_dir(home: Path, source: str, manifest: Path | None, selection: dict) -> Path:
    """One mirror per (source, manifest bytes, selection rule): a cached Preprocess keyed on the
    mirror's bytes is then never reused for another selection."""
    key = json.dumps({"source": source, "selection": selection,
                      "manifest": file_sha256(manifest) if manifest else None},
                     sort_keys=True)
    bucket = source[5:].split("/", 1)[0]
    return home / "data" / "s3" / f"{bucket}-{sha256_of([key.encode()])[:16]}"


def mirror(home: Path, source: str, manifest: Path | None, counts: str, per_count: int, seed: int,
           workers: int = 16, echo=print) -> Path:
    """Fetch the selection into the runner's cache (only what is missing or damaged) -> folder."""
    module = ingest()
    rule = module.rule_from(_Args(counts=counts, per_count=per_count, seed=seed, workers=workers))
    out = mirror_dir(home, source, manifest, rule.describe() if rule.active else {})
    echo(f"mirroring {source} ({'manifest ' + manifest.name if manifest else 'no manifest'}"
         f"{', selection ' + json.dumps(rule.describe()) if rule.active else ''}) into {out}")
    module.fetch_dataset(source, out, manifest, rule, workers, echo=echo)
    return out


class _Args:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)
