"""SmokeTest step: call the staging endpoint the run deployed, before anyone is asked to approve it.

Sends the test split's first --per-count photos of each count (seeded; smoke_cases.py), after one
warm-up request, then five malformed requests, and checks:
  - every photo is answered 200 with a count in 1..5, the count Evaluate predicted for the same
    file (--predictions: Evaluate's output, predictions.csv);
  - the p95 of the photos' request latencies is under --latency-ms;
  - every malformed request is answered with a 4xx and a JSON error: never a 5xx, never silence
    (each request has --timeout-s).
Writes <output>/smoke.json (the pipeline's PropertyFile): passed (1 or 0), reason, every answer,
the latencies, and `record`, the verdict as properties of the model version (SmokeTest: passed or
failed, SmokeTestDetail, SmokeTestRun). A failed smoke test is a verdict, not a failed job: the
job ends 0 and the pipeline's condition stops the execution with the reason.

Where the endpoint is: with $INVMON_ENDPOINT_URL, over HTTP (the local runner started the staging
endpoint for this step and records the verdict itself); otherwise the SageMaker endpoint
--endpoint-name through InvokeEndpoint, waiting until it is InService with the version under test
(--model-data), and the verdict is recorded on --model-package with UpdateModelPackage.

Exit status: 0 verdict written; 2 bad arguments or inputs; 1 the verdict could not be recorded.
Plain CLI: standard library, and boto3 on SageMaker only. No torch.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path

from smoke_cases import SmokeInputError, malformed_requests, read_predictions, select_photos
from smoke_clients import Answer, HttpEndpoint, SageMakerEndpoint

ENDPOINT_URL_ENV = "INVMON_ENDPOINT_URL"
BASE = "/opt/ml/processing"
# The version's properties the verdict is recorded as (the registry's names, on both back-ends).
RESULT_PROPERTY, DETAIL_PROPERTY, RUN_PROPERTY = "SmokeTest", "SmokeTestDetail", "SmokeTestRun"
MAX_REASON = 900  # the Fail step's message carries it; SageMaker keeps 1,024 characters of a reason
EXAMPLES = 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--endpoint-name", required=True, help="the endpoint under test")
    p.add_argument("--test", default=f"{BASE}/test", help="the test split: <count>/<id>.jpg")
    p.add_argument("--predictions", default=f"{BASE}/evaluation",
                   help="Evaluate's output folder (predictions.csv), or the file")
    p.add_argument("--output", default=f"{BASE}/smoke", help="where smoke.json is written")
    p.add_argument("--per-count", type=int, default=5, help="photos of each count")
    p.add_argument("--seed", type=int, default=0, help="which photos")
    p.add_argument("--latency-ms", type=float, required=True, help="the p95 latency must be under this")
    p.add_argument("--timeout-s", type=float, default=30.0, help="each request's answer deadline")
    p.add_argument("--wait-s", type=float, default=1800.0,
                   help="how long the endpoint may take to be ready (InService with this version)")
    p.add_argument("--model-package", default="",
                   help="the version under test: a model package ARN on SageMaker (the verdict is "
                        "recorded on it), group/version under the local runner")
    p.add_argument("--model-data", default="", help="its model.tar.gz: the endpoint must serve it")
    p.add_argument("--run", default="", help="the execution (or local run) recording the verdict")
    args = p.parse_args(argv)
    for name in ("per_count", "latency_ms", "timeout_s", "wait_s"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            p.error(f"--{name.replace('_', '-')} must be a positive number, got {value}")
    return args


def p95(values: list[float]) -> float:
    """The nearest-rank 95th percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def error_text(answer: Answer) -> str:
    body = answer.json()
    text = body.get("error") if body and isinstance(body.get("error"), str) else \
        answer.body[:120].decode(errors="replace")
    return " ".join(str(text).split())[:120]


def check_photo(photo, answer: Answer) -> tuple[str, str]:
    """("ok" | "wrong" | "broken", what is wrong) for one held-out photo's answer."""
    if answer.status is None:
        return "broken", answer.problem
    if answer.status != 200:
        return "broken", f"answered {answer.status} ({error_text(answer)})"
    count = (answer.json() or {}).get("count")
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= 5:
        return "broken", f"answered count {count!r}, not a count from 1 to 5"
    if count != photo.expected:
        return "wrong", f"answered {count}, Evaluate predicted {photo.expected}"
    return "ok", ""


def check_malformed(answer: Answer) -> str:
    """What is wrong with a malformed request's answer ("" when it is a 4xx with a JSON error)."""
    if answer.status is None:
        return answer.problem
    if answer.status >= 500:
        return f"got {answer.status} ({error_text(answer)}), a server error"
    if answer.status < 400:
        return f"got {answer.status}: accepted"
    body = answer.json()
    if not body or not isinstance(body.get("error"), str):
        return f"got {answer.status} without a JSON error"
    return ""


def examples(items: list[tuple[str, str]]) -> str:
    shown = "; ".join(f"{path}: {what}" for path, what in items[:EXAMPLES])
    return shown + ("; ..." if len(items) > EXAMPLES else "")


def smoke_test(endpoint, photos, latency_ms: float, wait_s: float, model_data: str = "") -> dict:
    """Every request and check; returns smoke.json's content (without the record)."""
    report = {"endpoint": endpoint.name, "photos": [], "malformed": [], "failures": [],
              "latency_ms": {"threshold": latency_ms}}
    jpeg = next((p.file.read_bytes() for p in photos if p.content_type == "image/jpeg"), None)
    if jpeg is None:
        raise SmokeInputError("no JPEG among the chosen photos to build the malformed requests from")
    malformed = malformed_requests(jpeg)
    if problem := endpoint.wait_ready(wait_s, model_data):
        report["failures"].append(problem)
        return report
    first = photos[0]
    endpoint.invoke(first.file.read_bytes(), first.content_type)  # warm-up: not timed, not judged
    wrong, broken, seconds = [], [], []
    for photo in photos:
        answer = endpoint.invoke(photo.file.read_bytes(), photo.content_type)
        verdict, what = check_photo(photo, answer)
        if answer.status is not None:
            seconds.append(answer.seconds)
        {"wrong": wrong, "broken": broken}.get(verdict, []).append((photo.path, what))
        report["photos"].append({"path": photo.path, "label": photo.label, "expected": photo.expected,
                                 "status": answer.status, "count": (answer.json() or {}).get("count"),
                                 "ms": round(answer.seconds * 1000, 1), "ok": verdict == "ok", "problem": what})
    if broken:
        report["failures"].append(f"{len(broken)} of {len(photos)} photos got no good answer ({examples(broken)})")
    if wrong:
        report["failures"].append(f"{len(wrong)} of {len(photos)} photos answered differently from "
                                  f"Evaluate ({examples(wrong)})")
    if seconds:
        latencies = [s * 1000 for s in seconds]
        report["latency_ms"].update(p50=round(sorted(latencies)[len(latencies) // 2], 1),
                                    p95=round(p95(latencies), 1), max=round(max(latencies), 1),
                                    requests=len(latencies))
        if p95(latencies) >= latency_ms:
            report["failures"].append(f"p95 latency {p95(latencies):.0f} ms is not under {latency_ms:g} ms")
    refused_badly = []
    for case in malformed:
        answer = endpoint.invoke(case.body, case.content_type)
        problem = check_malformed(answer)
        if problem:
            refused_badly.append((case.name, problem))
        report["malformed"].append({"case": case.name, "content_type": case.content_type,
                                    "bytes": len(case.body), "status": answer.status, "source": answer.source,
                                    "error": error_text(answer) if answer.status else answer.problem,
                                    "ok": not problem})
    if refused_badly:
        report["failures"].append(f"{len(refused_badly)} of {len(report['malformed'])} malformed requests "
                                  f"were not refused with a 4xx JSON error ({examples(refused_badly)})")
    return report


def property_text(text: str) -> str:
    """`text` as a model package property value may hold it (letters, digits, spaces and
    _.:/=+-@; at most 256 characters)."""
    return re.sub(r" +", " ", re.sub(r"[^\w .:/=+\-@]", " ", " ".join(str(text).split()))).strip()[:256]


def summary(report: dict, photos: int) -> str:
    if report["failures"]:
        return "; ".join(report["failures"])
    latency = report["latency_ms"]
    return (f"{photos} photos answered as Evaluate predicted; p95 latency {latency['p95']:.0f} ms under "
            f"{latency['threshold']:g} ms; {len(report['malformed'])} malformed requests refused with 4xx JSON errors")


def record(model_package: str, properties: dict, client=None) -> None:
    """The verdict on the model package (SageMaker): its CustomerMetadataProperties."""
    import boto3

    client = client or boto3.client("sagemaker")
    client.update_model_package(ModelPackageArn=model_package, CustomerMetadataProperties=properties)


def main(argv: list[str] | None = None, endpoint=None, sagemaker=None) -> int:
    args = parse_args(argv)
    url = os.environ.get(ENDPOINT_URL_ENV, "").strip()
    if not url and not args.model_package.startswith("arn:"):
        print(f"smoke: error: --model-package must be a model package ARN on SageMaker (got "
              f"{args.model_package!r}); a local run sets ${ENDPOINT_URL_ENV}", file=sys.stderr)
        return 2
    try:
        photos = select_photos(Path(args.test), read_predictions(Path(args.predictions)), args.per_count, args.seed)
        if endpoint is None:
            endpoint = (HttpEndpoint(url, args.timeout_s) if url
                        else SageMakerEndpoint(args.endpoint_name, sagemaker=sagemaker, timeout_s=args.timeout_s))
        print(f"smoke test of {args.endpoint_name}: {len(photos)} photos, p95 limit {args.latency_ms:g} ms", flush=True)
        report = smoke_test(endpoint, photos, args.latency_ms, args.wait_s, "" if url else args.model_data)
    except (SmokeInputError, ValueError) as exc:
        print(f"smoke: error: {exc}", file=sys.stderr)
        return 2
    passed = not report["failures"]
    text = summary(report, len(photos))
    report.update(passed=int(passed), reason="" if passed else text[:MAX_REASON], endpoint=args.endpoint_name)
    report["record"] = {RESULT_PROPERTY: "passed" if passed else "failed", DETAIL_PROPERTY: property_text(text)}
    if args.run:
        report["record"][RUN_PROPERTY] = property_text(args.run)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "smoke.json").write_text(json.dumps(report, indent=2) + "\n")
    for line in report["failures"]:
        print(f"FAILED: {line}", flush=True)
    print(f"smoke test {'passed' if passed else 'failed'}: {text}", flush=True)
    if url:
        print(f"the local runner records the verdict on {args.model_package}", flush=True)
        return 0
    try:
        record(args.model_package, report["record"], sagemaker)
    except Exception as exc:  # noqa: BLE001 - botocore's errors, in one line
        print(f"smoke: error: the verdict could not be recorded on {args.model_package}: {exc}", file=sys.stderr)
        return 1
    print(f"recorded {RESULT_PROPERTY}={report['record'][RESULT_PROPERTY]} on {args.model_package}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
