"""Does the monitor find drift on real photos, and only then? (make bench-drift)

    python benchmarks/drift_detection.py [--photos ../shared/data/abid-sample] [--work build/bench-drift]

1. Splits the real ABID sample once, seeded and stratified by count: 40% held out, never seen by
   the model; the rest is the data of a pipeline run (`invmon run --recipe local` at 224 px), whose
   registered version brings the artifact and the baseline Evaluate made from its test split.
   The run is kept in --work and reused while the split is the same (--retrain redoes it).
2. Serves the held-out photos through the local endpoint's app with capture on (bodies kept), as
   they are and shifted (drift_shifts.py): low light, blur, a camera change; and synthetic bins
   (pipeline.data.synth at a real photo's size). The fill-level shift is the held-out photos of 4
   and 5 items, as captured.
3. Draws windows of --window requests from the capture: --windows without drift, --windows / 2 of
   each shift, and runs the monitor's own analysis (monitor.load/analyse, what `invmon monitor`
   and the scheduled job run) on each: the share of windows called drift, and which tests called
   it.
4. The first --sagemaker-windows windows of each kind again as SageMaker's data capture files
   (base64 bodies, captures.as_sagemaker), embedded through the artifact (--model): the verdicts
   must be the same.

Prints a Markdown table and writes <work>/results.json.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
import time
import warnings
from collections import Counter
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np

from drift_shifts import PIXEL_SHIFTS, SHIFTS, labelled_photos, shifted

ROOT = Path(__file__).resolve().parent.parent
GROUP = "bin-count"
VERSION_HEADER = "X-Request-Id"


def split(photos: list[tuple[Path, int]], seed: int, held_out: float) -> tuple[list, list]:
    """(rest, held out), stratified by count."""
    rng = np.random.default_rng(seed)
    rest, out = [], []
    for count in range(1, 6):
        mine = [p for p in photos if p[1] == count]
        order = rng.permutation(len(mine))
        cut = round(held_out * len(mine))
        out += [mine[i] for i in order[:cut]]
        rest += [mine[i] for i in order[cut:]]
    return rest, out


def trained_version(work: Path, rest: list, retrain: bool, params: list[str]) -> dict:
    """The registered version of a pipeline run on `rest`: {artifact, baseline, version, accuracy}."""
    digest = hashlib.sha256(json.dumps([[p.name, c] for p, c in rest] + params).encode()).hexdigest()[:16]
    record = work / "model.json"
    if not retrain and record.is_file():
        kept = json.loads(record.read_text())
        if kept["split"] == digest and Path(kept["artifact"]).is_file() and Path(kept["baseline"]).is_file():
            print(f"model: {kept['version']} of {kept['home']} (trained on the same split; --retrain redoes it)")
            return kept
    data = work / "train-photos"
    for path, count in rest:  # one folder per count, linked: the run reads the real files
        link = data / str(count) / path.name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(path.resolve())
    home = work / f"home-{digest}"
    command = [sys.executable, "-m", "pipeline", "run", "--recipe", "local", "--data", str(data)]
    for param in params:
        command += ["--param", param]
    print("model: " + " ".join(command[1:]), flush=True)
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, env=dict(os.environ, INVMON_HOME=str(home)), check=True)
    from pipeline.registry.local import BASELINE_PROPERTY, open_registry

    version = open_registry(home).latest(GROUP)
    baseline = version.properties[BASELINE_PROPERTY]  # a file:// URI in the local registry
    kept = {"split": digest, "home": str(home), "version": version.name, "artifact": version.artifact_uri,
            "baseline": unquote(urlparse(baseline).path) if baseline.startswith("file:") else baseline,
            "accuracy": version.metrics["multiclass_classification_metrics"]["accuracy"]["value"],
            "minutes": round((time.perf_counter() - started) / 60, 1), "params": params}
    record.write_text(json.dumps(kept, indent=2) + "\n")
    return kept


def jpeg(image) -> bytes:
    """As a camera would send it (quality 95: its artefacts are not a shift of their own)."""
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def capture(work: Path, model: dict, held_out: list, synthetic: list, threads: int) -> dict[str, list[dict]]:
    """Every request served with capture on; the capture's records by kind (none, shifts)."""
    folder = work / f"capture-{model['split']}"
    done = folder / "done.json"
    if not done.is_file():
        import torch

        import photos
        from pipeline.serving.endpoint import ServingSettings, create_app

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from fastapi.testclient import TestClient

        torch.set_num_threads(threads)
        requests = [(f"none-{i}", path.read_bytes(), "image/jpeg") for i, (path, _) in enumerate(held_out)]
        for kind in PIXEL_SHIFTS:
            requests += [(f"{kind}-{i}", jpeg(shifted(photos.decode(path.read_bytes()), kind)), "image/jpeg")
                         for i, (path, _) in enumerate(held_out)]
        requests += [(f"synthetic-{i}", path.read_bytes(), "image/jpeg") for i, (path, _) in enumerate(synthetic)]
        # Every body kept, and nothing rotated away: the windows are drawn from all of it.
        settings = ServingSettings(capture_dir=str(folder), capture_body_sample=1.0, capture_max_mb=8192)
        started = time.perf_counter()
        with TestClient(create_app(Path(model["artifact"]), model_version=model["version"], settings=settings)) as client:
            for n, (request_id, body, content_type) in enumerate(requests, 1):
                response = client.post("/invocations", content=body,
                                       headers={"Content-Type": content_type, VERSION_HEADER: request_id})
                if response.status_code != 200:
                    raise SystemExit(f"{request_id}: HTTP {response.status_code} {response.text}")
                if n % 500 == 0:
                    print(f"  served {n}/{len(requests)}", flush=True)
        done.write_text(json.dumps({"requests": len(requests), "seconds": round(time.perf_counter() - started)}) + "\n")
    records: dict[str, list[dict]] = {}
    for path in sorted(folder.glob("capture-*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            kind, index = record["request_id"].rsplit("-", 1)
            records.setdefault(kind, []).append({**record, "_index": int(index)})
    labels = [count for _, count in held_out]
    records["fill_level"] = [r for r in records["none"] if labels[r["_index"]] >= 4]
    return records


def write_window(records: list[dict], path: Path, sagemaker: bool) -> Path:
    import captures

    with open(path, "w") as f:
        for record in records:
            record = {k: v for k, v in record.items() if k != "_index"}
            if sagemaker:
                record = captures.as_sagemaker(record, "JSON")
            elif "body" in record:  # the local capture's default: no photo bytes
                del record["body"]
            f.write(json.dumps(record) + "\n")
    return path


def judge(monitor, path: Path, model: dict, *extra: str) -> dict:
    args = monitor.parse_args(["--capture", str(path), "--baseline", model["baseline"], "--output", "-",
                               "--model-version", model["version"], *extra])
    with contextlib.redirect_stdout(io.StringIO()):
        result, _ = monitor.analyse(args, *judge.loaded.setdefault(extra, monitor.load(args)))
    return {"drift": result["drift"], "drifted": result["drifted"],
            "verdicts": {name: t["verdict"] for name, t in result["tests"].items()},
            "p_values": {name: t["p_value"] for name, t in result["tests"].items()}}


judge.loaded = {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=Path, default=ROOT.parent / "shared" / "data" / "abid-sample")
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "bench-drift")
    parser.add_argument("--held-out", type=float, default=0.4)
    parser.add_argument("--window", type=int, default=200)
    parser.add_argument("--windows", type=int, default=60, help="windows without drift (half as many per shift)")
    parser.add_argument("--sagemaker-windows", type=int, default=5, help="per kind, again as SageMaker capture")
    parser.add_argument("--synthetic", type=int, default=60, help="synthetic photos per count")
    parser.add_argument("--param", action="append", default=["ImageSize=224", "ResizeShortSide=256",
                                                               "AccuracyThreshold=0.2"])
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    photos = labelled_photos(args.photos)
    if len(photos) < 500:
        raise SystemExit(f"{args.photos}: {len(photos)} photos in 1/ ... 5/; the benchmark needs the real sample")
    args.work.mkdir(parents=True, exist_ok=True)
    rest, held_out = split(photos, args.seed, args.held_out)
    model = trained_version(args.work, rest, args.retrain, args.param)
    synth = args.work / "synthetic"
    if not (synth / "metadata").is_dir():
        from pipeline.data.synth import write_dataset

        write_dataset(synth, per_class=args.synthetic, seed=11, size=(448, 336))
    records = capture(args.work, model, held_out, labelled_photos(synth), args.threads)

    import monitor

    rng = np.random.default_rng(args.seed)
    plan = [("none", args.windows)] + [(shift, args.windows // 2) for shift in SHIFTS]
    windows = args.work / "windows"
    windows.mkdir(exist_ok=True)
    results: dict[str, list[dict]] = {}
    started = time.perf_counter()
    for kind, n in plan:
        pool = records[kind]
        for i in range(n):
            chosen = [pool[j] for j in np.sort(rng.choice(len(pool), min(args.window, len(pool)), replace=False))]
            local = judge(monitor, write_window(chosen, windows / "local.jsonl", False), model)
            if i < args.sagemaker_windows:
                on_sagemaker = judge(monitor, write_window(chosen, windows / "sagemaker.jsonl", True), model,
                                     "--model", model["artifact"])
                local["sagemaker_agrees"] = on_sagemaker["verdicts"] == local["verdicts"]
                local["sagemaker_verdicts"] = on_sagemaker["verdicts"]
            results.setdefault(kind, []).append(local)
        print(f"  {kind}: {sum(r['drift'] for r in results[kind])} of {n} windows drift", flush=True)
    seconds = time.perf_counter() - started

    tests = list(results["none"][0]["verdicts"])
    print(f"\nModel {model['version']} (local recipe at 224 px, trained on {len(rest)} real photos; test accuracy "
          f"{model['accuracy']:.3f}); {len(held_out)} held-out photos; windows of {args.window}; alpha 0.05 "
          f"(each of {len(tests)} tests at 0.05 / {len(tests)})\n")
    print("| windows | n | called drift | " + " | ".join(tests) + " | SageMaker capture: same verdicts |")
    print("|---" * (len(tests) + 4) + "|")
    summary = {}
    for kind, rows in results.items():
        fired = Counter(name for r in rows for name in r["drifted"])
        checked = [r["sagemaker_agrees"] for r in rows if "sagemaker_agrees" in r]
        rate = sum(r["drift"] for r in rows) / len(rows)
        summary[kind] = {"windows": len(rows), "drift_rate": rate, "tests": dict(fired),
                         "sagemaker_same": f"{sum(checked)}/{len(checked)}"}
        label = "no drift (false alarms)" if kind == "none" else kind.replace("_", " ")
        print(f"| {label} | {len(rows)} | {rate:.0%} | " + " | ".join(f"{fired[t] / len(rows):.0%}" for t in tests)
              + f" | {sum(checked)} of {len(checked)} |")
    print(f"\n{seconds / sum(len(r) for r in results.values()):.2f} s per window (SageMaker windows embed their photos)")
    (args.work / "results.json").write_text(json.dumps({"model": model, "summary": summary, "windows": results},
                                                       indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
