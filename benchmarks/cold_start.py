"""How long a new process takes to load an artifact and give its first answer: what an endpoint,
Evaluate or the monitor pays at start.

    python benchmarks/cold_start.py [--artifact MODEL.tar.gz] [--photo PHOTO] [--runs 3]

Each run is a new Python process that imports the artifact's own code/inference.py, calls model_fn
and answers one photo; the baseline does the same after `import torchvision`, which inference.py
did at its top before it imported torchvision only to build a ResNet. Prints the median wall and
CPU seconds of each and their ratio. Without --artifact: a stand-in EfficientNet-Lite0 artifact at
224 px with the repository's inference.py (random weights; loading costs what trained ones cost).
An artifact trained before that change carries the old inference.py, which imports torchvision.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

LOAD = """
import importlib.util, json, sys
{first}
spec = importlib.util.spec_from_file_location("inference", sys.argv[1] + "/code/inference.py")
inference = importlib.util.module_from_spec(spec); spec.loader.exec_module(inference)
model = inference.model_fn(sys.argv[1])
answer = inference.predict_fn(inference.input_fn(open(sys.argv[2], "rb").read(), "image/jpeg"), model)
print(json.dumps({{"count": answer["count"], "torchvision": "torchvision" in sys.modules}}))
"""


def one_run(code: str, folder: Path, photo: Path) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, str(folder), str(photo)], capture_output=True, text=True,
                          check=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall": wall, "cpu": cpu, **json.loads(done.stdout.splitlines()[-1])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", type=Path)
    parser.add_argument("--photo", type=Path)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp, "model")
        artifact = args.artifact
        if artifact is None:
            from serve_throughput import make_artifact  # beside this script: train.py's network, untrained

            artifact = make_artifact(Path(tmp, "stand-in"), arch="efficientnet_lite0", image_size=224)
        with tarfile.open(artifact) as tar:
            tar.extractall(folder, filter="data")
        photo = args.photo
        if photo is None:
            from serve_throughput import photo_bodies  # an ABID photo where ../shared has them

            photo = Path(tmp, "photo.jpg")
            photo.write_bytes(photo_bodies(1)[0])
        cases = {"as served": LOAD.format(first=""), "torchvision imported first": LOAD.format(first="import torchvision")}
        results = {name: [one_run(code, folder, photo) for _ in range(args.runs)] for name, code in cases.items()}
    summary = {name: {"wall_s": round(statistics.median(r["wall"] for r in runs), 2),
                      "cpu_s": round(statistics.median(r["cpu"] for r in runs), 2),
                      "count": runs[0]["count"], "torchvision_imported": runs[0]["torchvision"]}
               for name, runs in results.items()}
    served, baseline = summary["as served"], summary["torchvision imported first"]
    summary["wall ratio (as served / baseline)"] = round(served["wall_s"] / baseline["wall_s"], 2)
    summary["cpu ratio (as served / baseline)"] = round(served["cpu_s"] / baseline["cpu_s"], 2)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
