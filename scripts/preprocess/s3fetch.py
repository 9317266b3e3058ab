"""Read exactly the listed ABID objects from S3 (or any S3-compatible store) into a local mirror.

Used by `invmon data fetch`, by the local runner for `--data s3://...`, and by Preprocess itself
on SageMaker, so a photo reaches every executor through the same code:
- only the objects a manifest or selection rule names are read (keys are built from ids; the
  535k-image public bucket is never listed for a manifest);
- anonymous access when no credentials are configured (the public bucket needs none);
  `AWS_ENDPOINT_URL` and the other usual AWS settings are honoured by boto3 itself;
- bounded concurrency, and botocore's `standard` retry mode (exponential backoff with jitter on
  throttling, 5xx and connection errors) instead of a hand-written loop;
- every byte is checked: the body's MD5 against a single-part ETag, the length against
  Content-Length, and a file is renamed into place only once complete, so a kill at any moment
  leaves no half-written file a later run could take for good;
- a ledger (`.fetch-ledger.jsonl`) remembers what was verified, so a rerun after a kill or a
  network failure fetches only what is missing or damaged.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

LEDGER = ".fetch-ledger.jsonl"
PART = ".part-"


class FetchError(Exception):
    """A problem with the source as a whole (bad URI, no such bucket, access denied)."""


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> (bucket, "some/prefix/"); the prefix always ends in `/`."""
    if not uri.startswith("s3://"):
        raise FetchError(f"not an S3 URI: {uri!r} (expected s3://bucket/prefix/)")
    bucket, _, prefix = uri[5:].partition("/")
    if not bucket:
        raise FetchError(f"S3 URI {uri!r} names no bucket")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


def make_client(workers: int, anonymous: bool | None = None):
    """An S3 client sized for `workers` threads. Unsigned requests when asked, or when no
    credentials are configured at all (the public ABID bucket allows anonymous reads)."""
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    session = boto3.Session()
    if anonymous is None:
        anonymous = session.get_credentials() is None
    config = Config(
        retries={"mode": "standard", "max_attempts": 8},
        max_pool_connections=max(10, workers * 2),
        connect_timeout=10,
        read_timeout=60,
        signature_version=UNSIGNED if anonymous else None,
    )
    region = session.region_name or "us-east-1"  # aft-vbi-pds lives in us-east-1
    return boto3.client("s3", region_name=region, config=config)


def error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def is_missing(exc: BaseException) -> bool:
    return error_code(exc) in ("NoSuchKey", "404", "NotFound")


def describe(exc: BaseException) -> str:
    code = error_code(exc)
    if code:
        message = exc.response.get("Error", {}).get("Message", "")  # type: ignore[attr-defined]
        return f"{code}: {message}".rstrip(": ")
    return f"{type(exc).__name__}: {exc}"


def plain_etag(etag: str | None) -> str | None:
    """The MD5 hex an ETag stands for, or None for multipart/encrypted objects (no MD5 there)."""
    value = (etag or "").strip('"').lower()
    return value if len(value) == 32 and all(c in "0123456789abcdef" for c in value) else None


@dataclass(frozen=True)
class Fetched:
    """One object's outcome: `status` is present | fetched | missing | failed."""

    key: str
    path: Path
    status: str
    reason: str = ""
    etag: str | None = None

    @property
    def ok(self) -> bool:
        return self.status in ("present", "fetched")


class Ledger:
    """Append-only record of verified files: key, size, md5, etag. A torn last line (a kill in
    the middle of a write) is ignored, so the worst a kill costs is one re-download."""

    def __init__(self, root: Path):
        self.path = root / LEDGER
        self.entries: dict[str, dict] = {}
        self._lock = threading.Lock()
        if self.path.exists():
            for line in self.path.read_text(errors="replace").splitlines():
                try:
                    entry = json.loads(line)
                    self.entries[entry["file"]] = entry
                except (ValueError, KeyError, TypeError):
                    continue

    def intact(self, rel: str, path: Path) -> dict | None:
        """The entry for `rel` if the file on disk still has the recorded size and MD5."""
        entry = self.entries.get(rel)
        try:
            if entry is None or path.stat().st_size != entry["size"]:
                return None
            return entry if md5_file(path) == entry["md5"] else None
        except OSError:
            return None

    def record(self, rel: str, size: int, md5: str, etag: str | None) -> None:
        entry = {"file": rel, "size": size, "md5": md5, "etag": etag}
        with self._lock:
            with open(self.path, "a") as f:
                f.write(json.dumps(entry, sort_keys=True) + "\n")
            self.entries[rel] = entry


def md5_file(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def clean_partials(root: Path) -> None:
    """Remove what a killed run was writing (never taken for a finished file)."""
    for folder in (root, *[p for p in root.iterdir() if p.is_dir()]) if root.is_dir() else ():
        for part in folder.glob(f".*{PART}*"):
            part.unlink(missing_ok=True)


class Mirror:
    """Objects under s3://bucket/prefix/ mirrored to `root` under the same relative keys."""

    def __init__(self, client, bucket: str, prefix: str, root: Path):
        self.client, self.bucket, self.prefix, self.root = client, bucket, prefix, root
        root.mkdir(parents=True, exist_ok=True)
        clean_partials(root)
        self.ledger = Ledger(root)

    def fetch(self, rel: str) -> Fetched:
        """Make `root/rel` an intact copy of `prefix + rel`, downloading only when needed."""
        path = self.root / rel
        entry = self.ledger.intact(rel, path)
        if entry is not None:
            return Fetched(rel, path, "present", etag=entry["etag"])
        last = ""
        for _ in range(2):  # one more try when the bytes do not match the ETag (a bad transfer)
            try:
                result = self._download(rel, path)
            except Exception as exc:  # noqa: BLE001 - botocore has already retried transient errors
                if is_missing(exc):
                    return Fetched(rel, path, "missing", f"missing from {self.uri(rel)}")
                return Fetched(rel, path, "failed", f"fetch failed: {describe(exc)}")
            if result.ok:
                return result
            last = result.reason
        return Fetched(rel, path, "failed", last)

    def uri(self, rel: str) -> str:
        return f"s3://{self.bucket}/{self.prefix}{rel}"

    def _download(self, rel: str, path: Path) -> Fetched:
        response = self.client.get_object(Bucket=self.bucket, Key=self.prefix + rel)
        etag = response.get("ETag")
        expected_size = response.get("ContentLength")
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_name(f".{path.name}{PART}{os.getpid()}-{threading.get_ident()}")
        digest, size = hashlib.md5(usedforsecurity=False), 0
        try:
            with open(part, "wb") as out:
                for block in response["Body"].iter_chunks(1 << 16):
                    out.write(block)
                    digest.update(block)
                    size += len(block)
            md5 = digest.hexdigest()
            if expected_size is not None and size != expected_size:
                return Fetched(rel, path, "failed", f"transfer cut short: {size} of {expected_size} bytes")
            if plain_etag(etag) not in (None, md5):
                return Fetched(rel, path, "failed", f"checksum mismatch: body MD5 {md5} != ETag {etag}")
            os.replace(part, path)  # atomic: the name appears only with every byte behind it
        finally:
            part.unlink(missing_ok=True)
        self.ledger.record(rel, size, md5, etag)
        return Fetched(rel, path, "fetched", etag=etag)

    def head_etag(self, rel: str) -> tuple[str | None, int | None, str]:
        """(ETag, size, problem) of one object without reading it."""
        try:
            response = self.client.head_object(Bucket=self.bucket, Key=self.prefix + rel)
        except Exception as exc:  # noqa: BLE001
            return None, None, ("missing" if is_missing(exc) else f"head failed: {describe(exc)}")
        return response.get("ETag"), response.get("ContentLength"), ""

    def get_bytes(self, rel: str) -> bytes | None:
        """A small object's bytes (metadata), None when it does not exist."""
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.prefix + rel)["Body"].read()
        except Exception as exc:  # noqa: BLE001
            if is_missing(exc):
                return None
            raise

    def list(self, sub: str = "") -> list[str]:
        """Keys (relative to the prefix) under prefix + sub: used only when no manifest is given."""
        keys: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + sub):
                keys += [o["Key"][len(self.prefix):] for o in page.get("Contents", [])]
        except Exception as exc:  # noqa: BLE001
            raise FetchError(f"cannot list s3://{self.bucket}/{self.prefix}{sub}: {describe(exc)}") from None
        return keys


def check_bucket(client, bucket: str) -> None:
    """Fail early, with one line, on a bucket that does not exist or cannot be read."""
    try:
        client.head_bucket(Bucket=bucket)
    except Exception as exc:  # noqa: BLE001
        code = error_code(exc)
        if code in ("404", "NoSuchBucket"):
            raise FetchError(f"bucket {bucket!r} does not exist") from None
        if code in ("403", "AccessDenied"):
            return  # some public buckets refuse HeadBucket yet allow GetObject
        raise FetchError(f"cannot reach bucket {bucket!r}: {describe(exc)}") from None


def progress(total: int, desc: str):
    """A tqdm bar (count, rate, ETA; failures as a postfix); a plain line every 10 s in logs."""
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, dynamic_ncols=tty,
                mininterval=0.2 if tty else 10, ascii=not tty)


def run_parallel(fn, items, workers: int, bar=None, failed=lambda r: False) -> list:
    """fn over items with `workers` threads, results in input order, the bar advanced as they land."""
    results: list = [None] * len(items)
    failures = 0
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(fn, item): i for i, item in enumerate(items)}
        for future in as_completed(futures):
            result = future.result()
            results[futures[future]] = result
            if bar is not None:
                failures += bool(failed(result))
                bar.update(1)
                if failures:
                    bar.set_postfix(failures=failures, refresh=False)
    return results
