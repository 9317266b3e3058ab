"""The locked part of the real sample: split it off, then score a model's bulk CSV on it.

    python benchmarks/locked_split.py split [--data ../shared/data/abid-sample] [--out build/locked]
    invmon run --recipe real --data build/locked/rest                 # the recipe sees the rest only
    invmon predict build/locked/locked --out build/locked/counts.csv  # its staging model, on the locked part
    python benchmarks/locked_split.py score build/locked/counts.csv

The split is pipeline/data/locked.py's (20% of each count, by a seeded hash of the photo id).
`score` reads the count of each photo from its folder name and prints accuracy and RMSE with 95%
bootstrap intervals (2,000 resamples over photos, seed 0) and the accuracy of each count.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

from pipeline.data import locked

ROOT = Path(__file__).resolve().parents[1]


def score(rows: list[dict], resamples: int = 2000, seed: int = 0) -> dict:
    """Accuracy, RMSE (each with a 95% bootstrap interval) and per-count accuracy of bulk CSV rows
    whose path is .../<count>/<id>.jpg. A row with an error counts as a wrong answer."""
    truth = np.array([int(Path(r["path"]).parent.name) for r in rows])
    answered = np.array([int(r["count"]) if r["count"] else 0 for r in rows])
    right = (answered == truth).astype(float)
    squared = ((np.where(answered > 0, answered, 3) - truth) ** 2).astype(float)
    idx = np.random.default_rng(seed).integers(0, len(rows), (resamples, len(rows)))
    interval = lambda samples: [round(float(q), 4) for q in np.quantile(samples, [0.025, 0.975])]  # noqa: E731
    return {"photos": len(rows), "errors": int(np.sum(answered == 0)),
            "accuracy": round(float(right.mean()), 4), "accuracy_interval": interval(right[idx].mean(axis=1)),
            "rmse": round(float(np.sqrt(squared.mean())), 4),
            "rmse_interval": interval(np.sqrt(squared[idx].mean(axis=1))),
            "per_count": {str(c): round(float(right[truth == c].mean()), 4) for c in sorted(set(truth))}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("split", help="write out/rest/<count>/ and out/locked/<count>/")
    make.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "abid-sample")
    make.add_argument("--out", type=Path, default=ROOT / "build" / "locked")
    scored = commands.add_parser("score", help="accuracy, RMSE and per-count accuracy of a bulk CSV")
    scored.add_argument("csv", type=Path)
    args = parser.parse_args()
    if args.command == "split":
        try:
            print(json.dumps(locked.write(args.data, args.out)))
        except (OSError, ValueError) as exc:
            print(f"locked_split: {exc}", file=sys.stderr)
            return 1
        return 0
    with open(args.csv, newline="") as handle:
        print(json.dumps(score(list(csv.DictReader(handle))), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
