"""The local endpoint's data capture: what it served, for drift monitoring (docs/monitoring.md).

One JSON line per answered request, in rotating files under a folder:

    {"time": "2025-06-01T10:00:00.123Z", "request_id": "...", "model_version": "bin-count/3",
     "model_id": "...", "content_type": "image/jpeg", "size": 48213,
     "image": {"brightness": ..., "contrast": ..., "sharpness": ..., "width": ..., "height": ...},
     "answer": {"count": 3, "probabilities": {"1": ..., ...}},
     "embedding": {"dtype": "float32", "shape": [1280], "base64": "..."},
     "body": "<base64 of the request body>"}          # only for a sampled share, default none

Nothing here may slow or fail a request. The request only hands its parts to `Capture.offer`, a
non-blocking append to a queue bounded in bytes; one writer thread computes the image statistics
(on the photo already resized to the model's side), serialises and writes. When the queue is full
(the writer is behind or stalled) or a write fails (a full disk), the record is dropped and
counted by reason; /ping shows the counts. Files rotate at `file_bytes` and the folder is kept
under `max_bytes` by deleting the oldest capture files.
"""
from __future__ import annotations

import base64
import errno
import json
import logging
import os
import random
import threading
from collections import Counter, deque
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

log = logging.getLogger("invmon.endpoint")
PREFIX, SUFFIX = "capture-", ".jsonl"


class CaptureError(Exception):
    """The capture cannot start (a bad setting, a folder that cannot be made): one line."""


@dataclass
class Captured:
    """One answered request, as the request path hands it over (no work done on it yet)."""

    time: float
    request_id: str
    model_version: str
    model_id: str | None
    content_type: str
    size: int
    prediction: dict
    image: object = None  # the decoded photo at the model's side (the endpoint resized it early)
    side: int | None = None
    statistics: object = None  # the served artifact's photos.statistics, or None (an older artifact)
    embedding: np.ndarray | None = None
    body: bytes | None = None  # kept only for the sampled share

    def weight(self) -> int:
        """Bytes it holds while it waits: what the queue's budget counts."""
        pixels = self.image.size[0] * self.image.size[1] * 3 if self.image is not None else 0
        embedding = self.embedding.nbytes if self.embedding is not None else 0
        return 512 + pixels + embedding + len(self.body or b"")


def encode_array(values: np.ndarray) -> dict:
    values = np.ascontiguousarray(values, dtype="<f4")
    return {"dtype": "float32", "shape": list(values.shape),
            "base64": base64.b64encode(values.tobytes()).decode("ascii")}


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Capture:
    """The queue, the writer thread and the files. `offer` is all a request ever calls."""

    def __init__(self, folder: str | os.PathLike, *, file_bytes: int, max_bytes: int,
                 queue_bytes: int, sample: float = 1.0, body_sample: float = 0.0,
                 seed: int | None = None):
        for name, rate in (("capture_sample", sample), ("capture_body_sample", body_sample)):
            if not 0.0 <= rate <= 1.0:
                raise CaptureError(f"{name} {rate} refused: a share of requests, 0 to 1")
        if not 0 < file_bytes <= max_bytes or queue_bytes <= 0:
            raise CaptureError(f"capture sizes refused: a file rotates at {file_bytes} bytes, the folder "
                               f"holds {max_bytes}, the queue {queue_bytes}; each must be > 0 and a file "
                               "no larger than the folder")
        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CaptureError(f"capture folder {self.folder}: {exc.strerror or exc}") from None
        self.file_bytes, self.max_bytes, self.queue_bytes = file_bytes, max_bytes, queue_bytes
        self.sample, self.body_sample = sample, body_sample
        self._random = random.Random(seed)
        self._queue: deque[Captured] = deque()
        self._queued_bytes = 0
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._file = None
        self._file_path: Path | None = None
        self._sequence = 0
        self.written = 0
        self.bytes_written = 0
        self.dropped: Counter[str] = Counter()
        self.last_error: str | None = None

    # ------------------------------------------------------------------ the request's side

    def wants(self) -> tuple[bool, bool]:
        """(capture this request, keep its body): drawn before the body is let go."""
        take = self.sample >= 1.0 or self._random.random() < self.sample
        return take, take and self.body_sample > 0 and self._random.random() < self.body_sample

    def offer(self, record: Captured) -> bool:
        """Queue a record for the writer, or drop it (counted) when the queue is full. Never
        blocks: the lock guards a deque append and is never held across any I/O."""
        weight = record.weight()
        with self._lock:
            if self._stopping or self._queued_bytes + weight > self.queue_bytes:
                self.dropped["queue_full" if not self._stopping else "stopping"] += 1
                return False
            self._queue.append(record)
            self._queued_bytes += weight
            self._wake.notify()
        return True

    def status(self) -> dict:
        with self._lock:
            queued = len(self._queue)
        return {"folder": str(self.folder), "written": self.written, "dropped": sum(self.dropped.values()),
                "dropped_by_reason": dict(self.dropped), "queued": queued,
                "bytes_written": self.bytes_written, "last_error": self.last_error}

    # ------------------------------------------------------------------ the writer's side

    def start(self) -> "Capture":
        self._thread = threading.Thread(target=self._run, name="invmon-capture", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Write what is queued (up to `timeout`: a stalled disk does not hold the shutdown)."""
        with self._lock:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                with self._lock:
                    self.dropped["stopping"] += len(self._queue)
                    self._queue.clear()
        log.info("capture: %d requests written to %s, %d dropped %s", self.written, self.folder,
                 sum(self.dropped.values()), dict(self.dropped) or "")

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._stopping:
                    self._wake.wait()
                if not self._queue and self._stopping:
                    break
                batch = list(self._queue)
                self._queue.clear()
                self._queued_bytes = 0
            self._write(batch)
        self._close()

    def _write(self, batch: list[Captured]) -> None:
        lines = []
        for record in batch:
            try:
                lines.append(json.dumps(self.serialise(record), separators=(",", ":")) + "\n")
            except Exception as exc:  # noqa: BLE001 - a record that cannot be written is dropped, counted
                self._failed("unserialisable", f"{type(exc).__name__}: {exc}")
        data = "".join(lines).encode()
        if not data:
            return
        try:
            self._ensure_file(len(data))
            self._file.write(data)
            self._file.flush()
        except OSError as exc:
            # A full disk (ENOSPC), a quota, a vanished folder: these records are lost, counted;
            # the file may end in a torn line, so the next write starts a new one.
            reason = errno.errorcode.get(exc.errno, "write_error") if exc.errno else "write_error"
            for _ in lines:
                self._failed(reason, f"{exc.strerror or exc}")
            self._close()
            return
        self.written += len(lines)
        self.bytes_written += len(data)

    def _failed(self, reason: str, message: str) -> None:
        with self._lock:
            self.dropped[reason] += 1
            repeated, self.last_error = self.last_error == message, message
        if not repeated:  # one log line per kind of failure, not one per record
            log.warning("capture: dropping requests: %s", message)

    def serialise(self, record: Captured) -> dict:
        prediction = record.prediction
        out = {"time": iso(record.time), "request_id": record.request_id,
               "model_version": record.model_version, "model_id": record.model_id,
               "content_type": record.content_type, "size": record.size,
               "image": None,
               "answer": {"count": prediction.get("count"), "probabilities": prediction.get("probabilities")}}
        if callable(record.statistics) and record.image is not None and record.side:
            out["image"] = record.statistics(record.image, record.side)
        if record.embedding is not None:
            out["embedding"] = encode_array(record.embedding)
        if record.body is not None:
            out["body"] = base64.b64encode(record.body).decode("ascii")
        return out

    # ------------------------------------------------------------------ files

    def _ensure_file(self, incoming: int) -> None:
        if self._file is not None and self._file.tell() + incoming > self.file_bytes and self._file.tell() > 0:
            self._close()
        if self._file is None:
            self._sequence += 1
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
            self._file_path = self.folder / f"{PREFIX}{stamp}-{os.getpid()}-{self._sequence:06d}{SUFFIX}"
            self._file = open(self._file_path, "ab", buffering=0)
            self._prune()

    def _close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None
            self._prune()

    def _prune(self) -> None:
        """Delete the oldest capture files until the folder's capture files fit in max_bytes
        (the file being written counts as a full one: it may grow to file_bytes)."""
        try:
            files = sorted(p for p in self.folder.iterdir()
                           if p.name.startswith(PREFIX) and p.name.endswith(SUFFIX) and p.is_file())
            sizes = {p: p.stat().st_size for p in files}
        except OSError:
            return
        current = self._file_path if self._file is not None else None
        total = sum(sizes.values()) + (self.file_bytes - sizes.get(current, 0) if current else 0)
        for path in files:
            if total <= self.max_bytes:
                break
            if path == current:
                continue
            try:
                path.unlink()
                total -= sizes[path]
            except OSError:
                pass


def from_settings(settings) -> Capture | None:
    """The endpoint's capture from its ServingSettings (not started), or None when it is off.
    CaptureError for a setting out of range or a folder that cannot be made."""
    if not settings.capture_dir:
        return None
    mib = 1024 * 1024
    return Capture(settings.capture_dir, file_bytes=int(settings.capture_file_mb * mib),
                   max_bytes=int(settings.capture_max_mb * mib),
                   queue_bytes=int(settings.capture_queue_mb * mib), sample=settings.capture_sample,
                   body_sample=settings.capture_body_sample)
