"""Real ABID on this machine: `invmon data fetch`, the runner's mirror of `--data s3://...`, and
what `invmon run --data/--manifest` accept (an s3:// URI or a local path).

Both run the Preprocess container's own code (scripts/preprocess/ingest.py and s3fetch.py), so
a photo reaches a local run, a mirror and the SageMaker step through one reader and one checker.
"""
from __future__ import annotations

import json
import os
import re
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


# A bucket name as S3 spells it (3-63 lower-case letters, digits, dots, hyphens), then an optional
# key or prefix without blanks: the same shape the InputDataUrl parameter accepts.
S3_URI = re.compile(r"s3://(?P<bucket>[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])(?:/(?P<key>\S*))?")
URI_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]+:/")  # not a one-letter drive


class LocationError(ValueError):
    """A --data or --manifest value that names nothing usable (a usage error, exit 2)."""


class UnreadableObject(RuntimeError):
    """A well-formed s3:// URI whose object cannot be read (missing, refused, too large)."""


def _s3_uri(option: str, text: str, what: str) -> re.Match | None:
    """The parts of an s3:// URI; None for a local path; LocationError for any other URI, and for
    `s3:/x` or `S3://x`, which Path() would otherwise turn into a folder named `s3:`."""
    if not URI_SCHEME.match(text):
        return None
    match = S3_URI.fullmatch(text)
    if match is None:
        scheme = text.split(":", 1)[0]
        hint = (f"expected {what}" if scheme.lower() == "s3" else
                f"only s3:// URIs and local paths are read, not {scheme}:")
        raise LocationError(f"{option} {text!r} is not a valid S3 URI: {hint}")
    return match


def _local(option: str, text: str, folder: bool) -> Path:
    path = Path(text).expanduser()
    if not path.exists():
        raise LocationError(f"{option} {text}: no such {'folder' if folder else 'file'}")
    if folder and not path.is_dir():
        raise LocationError(f"{option} {text}: not a folder (photos: ABID bucket layout or one "
                            "folder per count)")
    return path.resolve()


def data_location(text: str) -> str:
    """`invmon run --data`: an s3://bucket/prefix/ URI as given, or an existing local folder (with
    `~` expanded) as an absolute path."""
    if _s3_uri("--data", text, "s3://bucket/prefix/"):
        return text
    return str(_local("--data", text, folder=True))


def manifest_location(home: Path, text: str, echo=print) -> Path:
    """`invmon run --manifest`: a local file, or an s3://bucket/key object copied (checked, at most
    abid.MAX_MANIFEST_BYTES) into $INVMON_HOME/data/manifests/, named by its content: the local
    runner reads local files, and a run keyed on the manifest's bytes is reused only for the same
    bytes. Raises LocationError for a malformed URI or a missing local file, UnreadableObject for
    an object that cannot be read."""
    match = _s3_uri("--manifest", text, "s3://bucket/key.json")
    if match is None:
        path = _local("--manifest", text, folder=False)
        if not path.is_file():
            raise LocationError(f"--manifest {text}: not a file (a file_list.json-style manifest)")
        return path
    key = match["key"] or ""
    if not key or key.endswith("/"):
        raise LocationError(f"--manifest {text!r} names no object: expected s3://bucket/key.json")
    module = ingest()
    s3fetch, limit = module.s3fetch, module.abid.MAX_MANIFEST_BYTES
    client = s3fetch.make_client(1)
    try:
        response = client.get_object(Bucket=match["bucket"], Key=key)
        if int(response.get("ContentLength") or 0) > limit:
            raise UnreadableObject(f"manifest {text} is over the {limit:,}-byte limit")
        body = response["Body"].read(limit + 1)
    except UnreadableObject:
        raise
    except Exception as exc:  # noqa: BLE001 - botocore has retried what can be retried
        what = "does not exist" if s3fetch.is_missing(exc) else f"cannot be read: {s3fetch.describe(exc)}"
        raise UnreadableObject(f"manifest {text} {what}") from None
    if len(body) > limit:
        raise UnreadableObject(f"manifest {text} is over the {limit:,}-byte limit")
    folder = home / "data" / "manifests"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{sha256_of([body])[:16]}.json"
    if not path.is_file():
        part = path.with_name(f".{path.name}.part-{os.getpid()}")
        part.write_bytes(body)
        os.replace(part, path)  # complete or absent
    echo(f"manifest {text} ({len(body):,} bytes) copied to {path}")
    return path


class _Args:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)
