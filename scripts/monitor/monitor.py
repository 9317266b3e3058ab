"""Monitor: is the serving model still seeing the photos it was made for?

Compares a window of captured requests (the local endpoint's capture, or SageMaker's data capture
files) with the baseline Evaluate made from the model's test split (baseline.json):

  embeddings         MMD two-sample test with a permutation p-value (drift.mmd_test)
  predicted_counts   chi-square test of homogeneity of the answered counts
  brightness, contrast, sharpness, width, height
                     two-sample Kolmogorov-Smirnov test of each image statistic

Each test calls drift when its p-value is under alpha / k (k: the tests that had data), so the
chance that a window of unchanged traffic raises any alarm stays under alpha. Writes
<output>/monitor.json (each test: statistic, threshold, p-value, verdict, window size) and
<output>/report.html (plots), and prints name=value lines (drift=0|1, ...). With
--cloudwatch-namespace NS --endpoint E it also publishes them as CloudWatch metrics
(cloudwatch.py: DriftDetected with the dimension EndpointName=E, which the stack's drift alarm
reads); a failed publish is exit 1, after monitor.json is written.

A capture of another model than the baseline's is refused in one line (exit 2): compare a model's
traffic only with its own baseline. SageMaker's capture holds the photos' bytes, not their
embeddings: pass --model (the served model.tar.gz) to embed them through the artifact's own code.

Plain CLI: it never imports pipeline/ or steps/.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

import captures
import drift
import monitor_report

CAPTURE = "/opt/ml/processing/capture"
BASELINE = "/opt/ml/processing/baseline/baseline.json"
OUTPUT = "/opt/ml/processing/monitor"
ALPHA = 0.05
MIN_WINDOW = 30  # fewer requests than this: no verdict (no_data), not a guess
MAX_WINDOW = 2000  # the embedding test's window is a seeded sample of at most this many
PERMUTATIONS = 1000
FORMAT = 1


class MonitorError(Exception):
    """Bad input (a missing baseline, an unreadable capture, another model): one line, exit 2."""


def utc(moment: datetime | None) -> str | None:
    return moment.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z") if moment else None


def load_baseline(path: Path) -> dict:
    try:
        baseline = json.loads(path.read_text())
    except OSError as exc:
        raise MonitorError(f"--baseline {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise MonitorError(f"--baseline {path}: not JSON ({exc})") from None
    if not isinstance(baseline, dict) or baseline.get("format") != 1 or "predicted_counts" not in baseline:
        raise MonitorError(f"--baseline {path}: not a baseline.json of format 1 (Evaluate writes it "
                           "beside evaluation.json)")
    return baseline


def select(requests: list, baseline: dict, model_version: str | None) -> list:
    """The requests of --model-version (all when none is given), refused unless every one of them
    was answered by the baseline's model."""
    if model_version is not None:
        found = Counter(r.model_version for r in requests)
        requests = [r for r in requests if r.model_version == model_version]
        if not requests and found:
            seen = ", ".join(f"{v} ({n})" for v, n in found.most_common(5))
            raise MonitorError(f"no captured request of model version {model_version} in the window "
                               f"(found: {seen})")
    expected = baseline["model"].get("model_id")

    def served_by(request) -> str:
        return request.model_id if request.model_id is not None else str(request.model_version)

    def ours(request) -> bool:
        if request.model_id is not None:
            return request.model_id == expected
        return request.model_version in (expected, model_version) and request.model_version is not None

    foreign = Counter(served_by(r) for r in requests if not ours(r))
    if foreign:
        other, n = foreign.most_common(1)[0]
        raise MonitorError(f"refused: {sum(foreign.values())} of the {len(requests)} captured requests were "
                           f"answered by model {other}{' and others' if len(foreign) > 1 else ''}, not by "
                           f"the baseline's model {expected}: monitor a model against its own baseline "
                           "(or pick its requests with --model-version)")
    return requests


def complete(requests: list, baseline: dict, embedder) -> Counter:
    """Compute the statistics (and, with the model, the embeddings) of requests captured as bytes
    only. Returns what could not be, by why."""
    missing = Counter()
    side = (baseline.get("image_statistics") or {}).get("side")
    todo = [r for r in requests if r.body is not None and (r.stats is None or r.embedding is None)]
    if not todo:
        return missing
    if embedder is not None:
        stats, embeddings = embedder.describe([(r.body, r.content_type) for r in todo], side or embedder_side(embedder))
        for request, s, e in zip(todo, stats, embeddings):
            request.stats = request.stats or s
            request.embedding = request.embedding if request.embedding is not None else e
            if s is None:
                missing["body does not decode"] += 1
        return missing
    try:
        import photos  # staged beside this script, as beside preprocess.py
    except ImportError:
        missing["no photos.py beside monitor.py to decode bodies"] += len(todo)
        return missing
    for request in todo:
        if request.stats is None and side:
            formats = photos.CONTENT_TYPE_FORMATS.get((request.content_type or "").split(";")[0].strip().lower(),
                                                      photos.FORMATS)
            try:
                request.stats = photos.statistics(photos.decode(request.body, formats=formats), side)
            except photos.ImageRejected:
                missing["body does not decode"] += 1
    return missing


def embedder_side(embedder) -> int:
    return int(embedder.model["config"]["image_size"])


def project(vectors: np.ndarray, summary: dict) -> np.ndarray:
    decode_array = captures.decode_array
    mean = decode_array(summary["projection"]["mean"])
    directions = decode_array(summary["projection"]["directions"])
    return (vectors - mean) @ directions.T


def run_tests(window: list, baseline: dict, alpha: float, permutations: int, seed: int,
              min_window: int, max_window: int) -> tuple[dict, dict]:
    """Every test's result, and the arrays the report plots."""
    decode_array = captures.decode_array

    summary = baseline.get("embeddings")
    embedded = [r.embedding for r in window if r.embedding is not None]
    counted = [r.count for r in window if r.count is not None]
    image = baseline.get("image_statistics")
    described = [r.stats for r in window if r.stats]
    names = list(image["names"]) if image else []

    planned = {}
    if not summary:
        planned["embeddings"] = "the baseline has no embeddings (" + "; ".join(baseline.get("notes") or ["-"]) + ")"
    elif len(embedded) < min_window:
        planned["embeddings"] = (f"{len(embedded)} requests with an embedding, fewer than {min_window}"
                                 + ("; SageMaker's capture needs --model to embed its photos"
                                    if any(r.source == "sagemaker" for r in window) and not embedded else ""))
    elif embedded[0].shape[-1] != summary["dimension"]:
        raise MonitorError(f"the captured embeddings have {embedded[0].shape[-1]} dimensions, the baseline's "
                           f"{summary['dimension']}: not the baseline's model")
    else:
        planned["embeddings"] = None
    planned["predicted_counts"] = None if len(counted) >= min_window else \
        f"{len(counted)} answered requests, fewer than {min_window}"
    for name in names:
        planned[name] = None if len(described) >= min_window else \
            f"{len(described)} requests with image statistics, fewer than {min_window}"
    with_data = sum(reason is None for reason in planned.values())
    threshold = alpha / max(with_data, 1)

    tests, plots = {}, {"threshold": threshold}
    for name, reason in planned.items():
        kind = ("mmd" if name == "embeddings" else "chi_square" if name == "predicted_counts" else "ks")
        if reason is not None:
            tests[name] = {"kind": kind, **drift.no_data(reason, threshold)}
            continue
        if name == "embeddings":
            vectors = np.stack(embedded)
            if len(vectors) > max_window:
                keep = np.sort(np.random.default_rng(seed).choice(len(vectors), max_window, replace=False))
                vectors = vectors[keep]
            reference = decode_array(summary["sample"])
            result = drift.mmd_test(reference, project(vectors, summary), threshold, permutations, seed)
            plots["embeddings"] = {"reference": reference, "window": project(vectors, summary),
                                   "null": result.pop("null"), "statistic": result["statistic"]}
        elif name == "predicted_counts":
            result = drift.counts_test(baseline["predicted_counts"], counted, threshold)
        else:
            values = [s[name] for s in described if s.get(name) is not None]
            result = drift.ks_test(image["values"][name], values, threshold)
            plots[name] = {"reference": image["values"][name], "window": values}
        tests[name] = {"kind": kind, **result}
    plots["predicted_counts"] = {"reference": baseline["predicted_counts"], "window": Counter(map(str, counted))}
    return tests, plots


def load(args: argparse.Namespace):
    """(baseline, embedder or None): what every window of these settings is compared with."""
    if not 0 < args.alpha < 1:
        raise MonitorError(f"--alpha {args.alpha} refused: a probability between 0 and 1")
    if args.permutations < 99 or args.min_window < 2 or args.max_window < args.min_window:
        raise MonitorError("--permutations must be >= 99, --min-window >= 2 and --max-window >= --min-window")
    baseline = load_baseline(Path(args.baseline))
    embedder = None
    if args.model:
        import embedder as embedding

        try:
            embedder = embedding.Embedder(Path(args.model))
        except embedding.ModelError as exc:
            raise MonitorError(str(exc)) from None
        expected = baseline["model"].get("artifact_sha256")
        if expected and embedder.sha256 != expected:
            raise MonitorError(f"refused: --model {args.model} (sha256 {embedder.sha256[:12]}) is not the artifact "
                               f"the baseline was made from (sha256 {expected[:12]}, model "
                               f"{baseline['model'].get('model_id')})")
    return baseline, embedder


def analyse(args: argparse.Namespace, baseline: dict, embedder=None) -> tuple[dict, dict]:
    """monitor.json's content for the window args.capture/--since/--until, and the report's plots."""
    try:
        since = captures.parse_time(args.since) if args.since else None
        until = captures.parse_time(args.until) if args.until else None
    except ValueError as exc:
        raise MonitorError(f"--since/--until: {exc}") from None
    try:
        requests, skipped = captures.read(Path(args.capture), since, until)
    except captures.CaptureError as exc:
        raise MonitorError(str(exc)) from None
    window = select(requests, baseline, args.model_version)
    missing = complete(window, baseline, embedder)
    tests, plots = run_tests(window, baseline, args.alpha, args.permutations, args.seed,
                             args.min_window, args.max_window)
    drifted = [name for name, t in tests.items() if t["verdict"] == drift.DRIFT]
    times = [r.time for r in window if r.time is not None]
    result = {
        "format": FORMAT,
        "made": utc(datetime.now(timezone.utc)),
        "model": {"model_id": baseline["model"].get("model_id"), "model_version": args.model_version,
                  "artifact_sha256": baseline["model"].get("artifact_sha256")},
        "baseline": {"path": str(args.baseline), "made": baseline.get("made")},
        "window": {"since": utc(since), "until": utc(until), "first": utc(min(times)) if times else None,
                   "last": utc(max(times)) if times else None, "requests": len(window),
                   "by_source": dict(Counter(r.source for r in window)), "skipped": dict(skipped),
                   "not_described": dict(missing)},
        "alpha": args.alpha,
        "correction": "Bonferroni: each test calls drift under alpha / k, k = the tests that had data",
        "tests": tests,
        "drift": bool(drifted),
        "drifted": drifted,
    }
    return result, plots


def monitor(args: argparse.Namespace) -> dict:
    result, plots = analyse(args, *load(args))
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "monitor.json").write_text(json.dumps(result, indent=2) + "\n")
    try:
        (output / "report.html").write_text(monitor_report.render(result, plots))
    except Exception as exc:  # noqa: BLE001 - a report that cannot be drawn does not void the verdicts
        print(f"report: not written ({type(exc).__name__}: {exc})", flush=True)
    return result


def summary(result: dict) -> str:
    window = result["window"]
    lines = [f"monitor: {window['requests']} requests ({window['first'] or '-'} to {window['last'] or '-'}) against "
             f"the baseline of {result['model']['model_id']}: "
             + (f"DRIFT in {', '.join(result['drifted'])}" if result["drift"] else "no drift")]
    for name, test in result["tests"].items():
        if test["verdict"] == drift.NO_DATA:
            lines.append(f"  {name}: no data ({test['detail']['reason']})")
        else:
            lines.append(f"  {name}: {test['verdict']} ({test['kind']} {test['statistic']:.4g}, p-value "
                         f"{test['p_value']:.3g}, drift under {test['threshold']:.3g}; window {test['window_size']})")
    lines.append(f"drift={int(result['drift'])}")
    lines.append(f"window_requests={window['requests']}")
    for name, test in result["tests"].items():
        if test["p_value"] is not None:
            lines.append(f"{name}_p_value={test['p_value']}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--capture", default=CAPTURE, help="a capture file, or a folder of *.jsonl (searched whole)")
    parser.add_argument("--baseline", default=BASELINE, help="the serving model's baseline.json")
    parser.add_argument("--output", default=OUTPUT, help="where monitor.json and report.html are written")
    parser.add_argument("--since", help="window start: ISO 8601 (UTC if no offset) or a duration back (6h, 7d)")
    parser.add_argument("--until", help="window end (excluded), as --since")
    parser.add_argument("--model-version", help="only the requests answered by this model version; refused "
                                                "if they are not the baseline's model")
    parser.add_argument("--model", help="the served model.tar.gz: embeds photos captured as bytes (SageMaker)")
    parser.add_argument("--alpha", type=float, default=ALPHA, help="the chance of a false alarm on a window")
    parser.add_argument("--permutations", type=int, default=PERMUTATIONS)
    parser.add_argument("--min-window", type=int, default=MIN_WINDOW)
    parser.add_argument("--max-window", type=int, default=MAX_WINDOW)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cloudwatch-namespace", help="also publish the verdicts as CloudWatch metrics in this "
                                                       "namespace (invmon/Monitor on AWS); without it, no AWS call")
    parser.add_argument("--endpoint", help="with --cloudwatch-namespace: the EndpointName dimension")
    return parser.parse_args(argv)


def cloudwatch_problem(args: argparse.Namespace) -> str | None:
    """Why --cloudwatch-namespace/--endpoint cannot be used as given, or None."""
    if args.cloudwatch_namespace is None:
        return "--endpoint names the metrics' endpoint: give --cloudwatch-namespace too" if args.endpoint else None
    if not re.fullmatch(r"[A-Za-z0-9.\-_/#:]{1,255}", args.cloudwatch_namespace) or \
            args.cloudwatch_namespace.startswith("AWS/"):
        return f"--cloudwatch-namespace {args.cloudwatch_namespace!r}: not a namespace of ours"
    if not re.fullmatch(r"[A-Za-z0-9](-*[A-Za-z0-9]){0,62}", args.endpoint or ""):
        return "--cloudwatch-namespace needs --endpoint NAME (a SageMaker endpoint name): the metrics' EndpointName"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if problem := cloudwatch_problem(args):
            raise MonitorError(problem)
        result = monitor(args)
    except MonitorError as exc:
        print(f"monitor: error: {exc}", file=sys.stderr)
        return 2
    print(summary(result))
    print(f"wrote {Path(args.output) / 'monitor.json'}")
    if args.cloudwatch_namespace:
        import cloudwatch

        try:
            put = cloudwatch.publish(result, args.cloudwatch_namespace, args.endpoint)
        except cloudwatch.MetricsError as exc:  # the verdicts are written; the run still failed
            print(f"monitor: error: {exc}", file=sys.stderr)
            return 1
        print(f"published {put} metrics to CloudWatch ({args.cloudwatch_namespace}, EndpointName={args.endpoint})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
