"""Captured requests, from either endpoint, as one kind of record.

- The local endpoint's capture (pipeline/serving/capture.py): one JSON line per answered request
  with its time, model version and id, the photo's statistics, the answer and the embedding
  (and the photo's bytes for a sampled share).
- SageMaker's DataCaptureConfig files: one JSON line per request,
  {"captureData": {"endpointInput": {"observedContentType", "mode", "data", "encoding"},
                   "endpointOutput": {...}},
   "eventMetadata": {"eventId", "inferenceTime"}, "eventVersion": "0"}:
  the photo's bytes in base64, the model's JSON answer as text ("JSON") or base64. Their
  statistics and embedding are computed later, from the bytes (monitor.py).

A folder is read whole (every *.jsonl under it, as SageMaker lays them out by hour); lines that
are not a capture record are counted, not fatal (a torn last line after a full disk).
"""
from __future__ import annotations

import base64
import binascii
import json
import re
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np


class CaptureError(Exception):
    """The capture cannot be read (no such path, no capture files): one line."""


@dataclass
class Request:
    where: str  # file:line, for messages
    source: str  # "local" or "sagemaker"
    time: datetime | None
    model_version: str | None
    model_id: str | None
    content_type: str | None
    count: int | None
    stats: dict | None
    embedding: np.ndarray | None
    body: bytes | None


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """ISO 8601 (a date, or a time with Z or an offset; naive means UTC), or a duration back from
    now: 30m, 6h, 7d."""
    text = text.strip()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([mhd])", text)
    if match:
        unit = {"m": "minutes", "h": "hours", "d": "days"}[match[2]]
        return (now or datetime.now(timezone.utc)) - timedelta(**{unit: float(match[1])})
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{text!r} is neither an ISO 8601 time nor a duration such as 6h or 7d") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def decode_array(record: dict) -> np.ndarray:
    """{"dtype": "float32", "shape": [...], "base64": ...}: how the capture and baseline.json
    store arrays (little-endian float32)."""
    return np.frombuffer(base64.b64decode(record["base64"]), "<f4").reshape(record["shape"]).astype(np.float64)


def _array(record) -> np.ndarray | None:
    return decode_array(record) if isinstance(record, dict) and "base64" in record else None


def _local(obj: dict, where: str) -> Request:
    answer = obj.get("answer") or {}
    body = base64.b64decode(obj["body"]) if obj.get("body") else None
    return Request(where, "local", parse_time(obj["time"]) if obj.get("time") else None,
                   obj.get("model_version"), obj.get("model_id"), obj.get("content_type"),
                   answer.get("count"), obj.get("image"), _array(obj.get("embedding")), body)


def _payload(part: dict) -> bytes:
    data = part.get("data") or ""
    if (part.get("encoding") or "").upper() == "BASE64":
        return base64.b64decode(data)
    return data.encode("utf-8")


def _sagemaker(obj: dict, where: str) -> Request:
    capture = obj["captureData"]
    metadata = obj.get("eventMetadata") or {}
    request, response = capture.get("endpointInput"), capture.get("endpointOutput")
    body = _payload(request) if request else None
    answer = {}
    if response:
        try:
            answer = json.loads(_payload(response))
        except ValueError:
            answer = {}  # an error page, not the model's answer
    answer = answer if isinstance(answer, dict) else {}
    when = metadata.get("inferenceTime")
    return Request(where, "sagemaker", parse_time(when) if when else None, answer.get("model_version"),
                   None, (request or {}).get("observedContentType"), answer.get("count"), None, None, body)


def as_sagemaker(record: dict, output_encoding: str = "JSON") -> dict:
    """A local capture record (with its photo's bytes) as SageMaker's DataCaptureConfig writes the
    same request: the body in base64, the model's JSON answer, the event's time and id; no
    statistics, no embedding. For tests and benchmarks that check both formats agree."""
    if not record.get("body"):
        raise ValueError(f"request {record.get('request_id')}: captured without its photo's bytes")
    answer = json.dumps({**record["answer"], "model_version": record["model_version"]})
    output = {"observedContentType": "application/json", "mode": "OUTPUT", "encoding": output_encoding,
              "data": answer if output_encoding == "JSON" else base64.b64encode(answer.encode()).decode()}
    return {"captureData": {"endpointInput": {"observedContentType": record["content_type"], "mode": "INPUT",
                                              "data": record["body"], "encoding": "BASE64"},
                            "endpointOutput": output},
            "eventMetadata": {"eventId": record["request_id"], "inferenceTime": record["time"]},
            "eventVersion": "0"}


def capture_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CaptureError(f"--capture {path}: no such file or folder")
    files = sorted(p for p in path.rglob("*.jsonl") if p.is_file())
    if not files:
        raise CaptureError(f"--capture {path}: no *.jsonl capture files under it")
    return files


def read(path: Path, since: datetime | None = None, until: datetime | None = None) -> tuple[list[Request], Counter]:
    """The requests captured in [since, until), oldest first, and what was skipped, by why."""
    requests, skipped = [], Counter()
    for file in capture_files(path):
        try:
            handle = open(file, encoding="utf-8", errors="replace")
        except OSError as exc:
            raise CaptureError(f"cannot read {file}: {exc.strerror or exc}") from None
        with handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                where = f"{file}:{number}"
                try:
                    obj = json.loads(line)
                    if not isinstance(obj, dict):
                        raise ValueError("not an object")
                    if "captureData" in obj:
                        request = _sagemaker(obj, where)
                    elif "answer" in obj:
                        request = _local(obj, where)
                    else:
                        skipped["not a capture record"] += 1
                        continue
                except (ValueError, KeyError, TypeError, binascii.Error):
                    skipped["unreadable line"] += 1
                    continue
                if request.time is not None and ((since and request.time < since) or (until and request.time >= until)):
                    skipped["outside the window"] += 1
                    continue
                requests.append(request)
    requests.sort(key=lambda r: r.time or datetime.min.replace(tzinfo=timezone.utc))
    return requests, skipped
