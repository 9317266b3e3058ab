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
  network failure fetches only what is missing or damaged;
- GETs go through a reader: botocore's client, or the AWS Common Runtime's S3 client (awscrt,
  when installed) whose native HTTP stack and signer cost a fraction of botocore's Python CPU per
  request (docs/benchmarks.md, `make bench-ingest`). HEAD and LIST stay with botocore.
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
MAX_ATTEMPTS = 8  # botocore's standard retry mode: throttling, 5xx, connection errors
CONNECT_TIMEOUT, READ_TIMEOUT = 10, 60


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
        retries={"mode": "standard", "max_attempts": MAX_ATTEMPTS},
        max_pool_connections=max(1, workers),  # one connection per thread, kept and reused
        connect_timeout=CONNECT_TIMEOUT,
        read_timeout=READ_TIMEOUT,
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
        self._file = None
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
        line = json.dumps(entry, sort_keys=True) + "\n"
        with self._lock:
            if self._file is None:  # kept open: one write per line, each reaching the OS at once
                self._file = open(self.path, "a", buffering=1)
            self._file.write(line)
            self.entries[rel] = entry

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


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


class BotoReader:
    """GetObject through botocore: the body streamed to `sink` in 64 KiB blocks."""

    name = "botocore"

    def __init__(self, client):
        self.client = client

    def get(self, bucket: str, key: str, sink) -> tuple[str | None, int | None]:
        """Stream the object into sink(bytes); (ETag, Content-Length). Raises botocore's errors."""
        response = self.client.get_object(Bucket=bucket, Key=key)
        for block in response["Body"].iter_chunks(1 << 16):
            sink(block)
        return response.get("ETag"), response.get("ContentLength")

    def close(self) -> None:
        pass


class CrtError(Exception):
    """An S3 error answer or a transport failure from awscrt, shaped like botocore's ClientError
    (`response["Error"]["Code"]`) so that is_missing() and describe() read both the same way."""

    def __init__(self, code: str, message: str, status: int | None = None):
        super().__init__(f"{code}: {message}")
        self.response = {"Error": {"Code": code, "Message": message},
                         "ResponseMetadata": {"HTTPStatusCode": status}}


class CrtReader:
    """GetObject through the AWS Common Runtime's S3 client: its native HTTP stack, signer and
    retry strategy (standard, exponential backoff with jitter) instead of botocore's Python ones.
    The endpoint, region and credentials are botocore's (AWS_ENDPOINT_URL and the rest, refreshed
    credentials through a delegate); anonymous requests are unsigned."""

    name = "awscrt"

    def __init__(self, workers: int, anonymous: bool | None = None, region: str | None = None):
        import boto3
        from urllib.parse import urlsplit

        from awscrt import auth, http, io, s3

        self._s3, self._http = s3, http
        session = boto3.Session()
        credentials = session.get_credentials()
        if anonymous is None:
            anonymous = credentials is None
        self.region = region or session.region_name or "us-east-1"  # the bucket's, when known
        # botocore resolves the endpoint (AWS_ENDPOINT_URL, the region's S3 endpoint) once.
        endpoint = urlsplit(session.client("s3", region_name=self.region).meta.endpoint_url)
        self.host = endpoint.netloc
        self.aws = (endpoint.hostname or "").endswith(".amazonaws.com")
        signing = None
        if not anonymous:
            def frozen():
                c = credentials.get_frozen_credentials()
                return auth.AwsCredentials(c.access_key, c.secret_key, c.token)
            signing = s3.create_default_s3_signing_config(
                region=self.region, credential_provider=auth.AwsCredentialsProvider.new_delegate(frozen))
        events = io.EventLoopGroup(1)  # one native thread: the fetch threads only wait on it
        self.client = s3.S3Client(
            bootstrap=io.ClientBootstrap(events, io.DefaultHostResolver(events)),
            region=self.region, signing_config=signing,
            tls_mode=s3.S3RequestTlsMode.DISABLED if endpoint.scheme == "http" else s3.S3RequestTlsMode.ENABLED,
            max_active_connections_override=max(1, workers),
            retry_config=s3.S3RetryConfig(max_retries=MAX_ATTEMPTS - 1),
            connect_timeout_ms=CONNECT_TIMEOUT * 1000)

    def _target(self, bucket: str, key: str) -> tuple[str, str]:
        """(Host, path): virtual-hosted on AWS, path-style elsewhere (a local store's IP)."""
        from urllib.parse import quote

        path = "/" + quote(key, safe="/~")
        if not self.aws or "." in bucket:
            return self.host, f"/{bucket}{path}"
        return f"{bucket}.{self.host}", path

    def get(self, bucket: str, key: str, sink) -> tuple[str | None, int | None]:
        host, path = self._target(bucket, key)
        received: dict[str, str] = {}
        request = self._http.HttpRequest("GET", path, self._http.HttpHeaders([("Host", host)]))
        done = self.client.make_request(
            type=self._s3.S3RequestType.GET_OBJECT, request=request,
            on_headers=lambda status_code, headers, **_: received.update((k.lower(), v) for k, v in headers),
            on_body=lambda chunk, **_: sink(chunk))
        try:
            done.finished_future.result(timeout=READ_TIMEOUT)
        except TimeoutError:
            done.cancel()  # a stalled transfer fails like botocore's read timeout mid-body
            raise CrtError("RequestTimeout", f"no complete answer in {READ_TIMEOUT} s") from None
        except self._s3.S3ResponseError as exc:
            raise crt_error(exc) from None
        except Exception as exc:  # noqa: BLE001 - awscrt's own (connection) errors, after its retries
            raise CrtError(getattr(exc, "name", type(exc).__name__), str(exc)) from None
        length = received.get("content-length", "")
        return received.get("etag"), int(length) if length.isdigit() else None

    def close(self) -> None:
        self.client = None  # awscrt shuts its native client down when the last reference goes


def crt_error(exc) -> CrtError:
    """An S3 error answer (its XML <Code>) or the CRT's own error name."""
    import re

    body = (exc.body or b"")[:4096].decode("utf-8", "replace")
    code = re.search(r"<Code>([^<]{1,64})</Code>", body)
    message = re.search(r"<Message>([^<]{0,300})</Message>", body)
    status = exc.status_code
    return CrtError(code[1] if code else str(status or exc.name),
                    message[1] if message else exc.message or "", status)


def crt_available() -> bool:
    try:
        import awscrt.s3  # noqa: F401
    except ImportError:
        return False
    return True


def make_reader(client, workers: int, transport: str = "auto", anonymous: bool | None = None,
                region: str | None = None):
    """The reader GETs go through: `crt` (awscrt), `botocore` (`client`), or `auto`: the CRT when
    awscrt is installed, botocore otherwise. `region`: the bucket's (check_bucket's answer)."""
    if transport not in ("auto", "crt", "botocore"):
        raise FetchError(f"unknown S3 client {transport!r} (auto, crt or botocore)")
    if transport == "crt" or (transport == "auto" and crt_available()):
        if not crt_available():
            raise FetchError("the CRT S3 client needs awscrt: pip install awscrt")
        return CrtReader(workers, anonymous, region)
    return BotoReader(client)


@dataclass(frozen=True)
class Read:
    """A small object read into memory (metadata): at most `limit` + 1 bytes kept, `size` in all;
    `status` is fetched | missing | failed."""

    status: str
    body: bytes = b""
    size: int = 0
    reason: str = ""


class Mirror:
    """Objects under s3://bucket/prefix/ mirrored to `root` under the same relative keys."""

    def __init__(self, client, bucket: str, prefix: str, root: Path, reader=None):
        self.client, self.bucket, self.prefix, self.root = client, bucket, prefix, root
        self.reader = reader or BotoReader(client)
        root.mkdir(parents=True, exist_ok=True)
        clean_partials(root)
        self.ledger = Ledger(root)
        self._folders: set[Path] = set()  # made already: no mkdir per object

    def close(self) -> None:
        self.ledger.close()
        self.reader.close()

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
        if path.parent not in self._folders:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._folders.add(path.parent)
        part = path.with_name(f".{path.name}{PART}{os.getpid()}-{threading.get_ident()}")
        try:
            with open(part, "wb") as out:
                body = _Body(out.write)
                etag, expected_size = self.reader.get(self.bucket, self.prefix + rel, body)
            problem = body.problem(etag, expected_size)
            if problem:
                return Fetched(rel, path, "failed", problem)
            os.replace(part, path)  # atomic: the name appears only with every byte behind it
        finally:
            part.unlink(missing_ok=True)
        self.ledger.record(rel, body.size, body.md5, etag)
        return Fetched(rel, path, "fetched", etag=etag)

    def read(self, rel: str, limit: int) -> Read:
        """A small object into memory, checked as fetch() checks a file, never written to disk
        (Preprocess's metadata: parsed once, kept nowhere). Past `limit` bytes the rest is only
        counted, so a hostile size costs no memory."""
        last = ""
        for _ in range(2):
            kept = bytearray()

            def keep(block: bytes) -> None:
                if len(kept) <= limit:
                    kept.extend(block[: limit + 1 - len(kept)])

            body = _Body(keep)
            try:
                etag, expected_size = self.reader.get(self.bucket, self.prefix + rel, body)
            except Exception as exc:  # noqa: BLE001 - retried by the client already
                if is_missing(exc):
                    return Read("missing", reason=f"missing from {self.uri(rel)}")
                return Read("failed", reason=f"fetch failed: {describe(exc)}")
            last = body.problem(etag, expected_size)
            if not last:
                return Read("fetched", bytes(kept), body.size)
        return Read("failed", reason=last)

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


class _Body:
    """A sink for a GET's body: each block to `write`, counted and MD5-hashed on the way."""

    def __init__(self, write):
        self.write, self.size, self.digest = write, 0, hashlib.md5(usedforsecurity=False)

    def __call__(self, block: bytes) -> None:
        self.write(block)
        self.digest.update(block)
        self.size += len(block)

    @property
    def md5(self) -> str:
        return self.digest.hexdigest()

    def problem(self, etag: str | None, expected_size: int | None) -> str:
        if expected_size is not None and self.size != expected_size:
            return f"transfer cut short: {self.size} of {expected_size} bytes"
        if plain_etag(etag) not in (None, self.md5):
            return f"checksum mismatch: body MD5 {self.md5} != ETag {etag}"
        return ""


def check_bucket(client, bucket: str) -> str | None:
    """Fail early, with one line, on a bucket that does not exist or cannot be read. Returns the
    bucket's region when S3 says it (botocore follows a wrong region's redirect itself; the CRT
    client must be told)."""
    try:
        response = client.head_bucket(Bucket=bucket)
    except Exception as exc:  # noqa: BLE001
        code = error_code(exc)
        if code in ("404", "NoSuchBucket"):
            raise FetchError(f"bucket {bucket!r} does not exist") from None
        if code in ("403", "AccessDenied"):  # some public buckets refuse HeadBucket yet allow GetObject
            return bucket_region(getattr(exc, "response", None))
        raise FetchError(f"cannot reach bucket {bucket!r}: {describe(exc)}") from None
    return bucket_region(response)


def bucket_region(response: dict | None) -> str | None:
    headers = (response or {}).get("ResponseMetadata", {}).get("HTTPHeaders", {})
    return headers.get("x-amz-bucket-region") or None


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
