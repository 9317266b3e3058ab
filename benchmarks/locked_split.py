"""The locked part of the real sample: split it off, then score a model's bulk CSV on it.

    python benchmarks/locked_split.py split [--data ../shared/data/abid-sample] [--out build/locked]
    invmon run --recipe real --data build/locked/rest                 # the recipe sees the rest only
    invmon predict build/locked/locked --out build/locked/counts.csv  # its staging model, on the locked part
    python benchmarks/locked_split.py score build/locked/counts.csv
    python benchmarks/locked_split.py compare A.csv B.csv [A2.csv B2.csv ...]   # B minus A, paired
    python benchmarks/locked_split.py predict MODEL.tar.gz --tta flips --out B.csv  # a serving setting changed
    python benchmarks/locked_split.py offset TEST.csv OOF.json [OOF2.json ...]     # a model against the CV's

The split is pipeline/data/locked.py's (20% of each count, by a seeded hash of the photo id).
`score` reads the count of each photo from its folder name and prints accuracy and RMSE with 95%
bootstrap intervals (2,000 resamples over photos, seed 0) and the accuracy of each count.
`compare` scores two recipes on the same photos: for each pair of CSVs (A's answers, then B's, say
one seed's runs without and with a change), B minus A in accuracy and RMSE with 95% intervals from
the same resamples of the photos for both, the photos only one of them got right, and with two or
more pairs the mean difference over the pairs (each resample drawn once for every pair).
`predict` answers the locked part with a registered artifact's own code, as a bulk CSV, with its
model_config.json's serving settings changed (`--tta`): a setting tried without training again.
`offset` sets a model's expected counts (the p1..p5 of an `invmon predict` CSV, say of its run's
own test photos) against those of the CV's out-of-fold answers (real_finetune_cv.py --oof files,
their TTA probabilities averaged) on the same photos: per count, and the paired mean difference
with its standard error. The rounded expected count decodes a count, so a model whose answers sit
higher than the CV's loses count 1 first.
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


def truth_and_answers(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """The count of each row's photo (its folder's name) and the count answered; an error
    answers 0, which is never right."""
    return (np.array([int(Path(r["path"]).parent.name) for r in rows]),
            np.array([int(r["count"]) if r["count"] else 0 for r in rows]))


def squared_errors(answered: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Each answer's squared error, an error (0) scored as the middle count, 3."""
    return ((np.where(answered > 0, answered, 3) - truth) ** 2).astype(float)


def interval(samples: np.ndarray) -> list[float]:
    """The 95% interval of bootstrap samples."""
    return [round(float(q), 4) for q in np.quantile(samples, [0.025, 0.975])]


def score(rows: list[dict], resamples: int = 2000, seed: int = 0) -> dict:
    """Accuracy, RMSE (each with a 95% bootstrap interval) and per-count accuracy of bulk CSV rows
    whose path is .../<count>/<id>.jpg. A row with an error counts as a wrong answer."""
    truth, answered = truth_and_answers(rows)
    right = (answered == truth).astype(float)
    squared = squared_errors(answered, truth)
    idx = np.random.default_rng(seed).integers(0, len(rows), (resamples, len(rows)))
    return {"photos": len(rows), "errors": int(np.sum(answered == 0)),
            "accuracy": round(float(right.mean()), 4), "accuracy_interval": interval(right[idx].mean(axis=1)),
            "rmse": round(float(np.sqrt(squared.mean())), 4),
            "rmse_interval": interval(np.sqrt(squared[idx].mean(axis=1))),
            "per_count": {str(c): round(float(right[truth == c].mean()), 4) for c in sorted(set(truth))}}


def answers(rows: list[dict]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(photos as <count>/<file>, true counts, answers), in that order. Photos are named by their
    last two parts, so CSVs written from another folder pair."""
    named = sorted((f"{Path(r['path']).parent.name}/{Path(r['path']).name}", r) for r in rows)
    return ([name for name, _ in named], *truth_and_answers([r for _, r in named]))


def compare(pairs: list[tuple[list[dict], list[dict]]], resamples: int = 2000, seed: int = 0) -> dict:
    """B minus A for each (A rows, B rows) pair, paired on the same photos, and their mean."""
    loaded = [(answers(a), answers(b)) for a, b in pairs]
    paths, truth, _ = loaded[0][0]
    for (pa, _, _), (pb, _, _) in loaded:
        if pa != paths or pb != paths:
            raise ValueError("every CSV must answer the same photos")
    idx = np.random.default_rng(seed).integers(0, len(paths), (resamples, len(paths)))
    differences, per_pair = [], []
    for (_, _, a), (_, _, b) in loaded:
        right_a, right_b = (a == truth).astype(float), (b == truth).astype(float)
        squared_a, squared_b = squared_errors(a, truth), squared_errors(b, truth)
        accuracy = right_b[idx].mean(1) - right_a[idx].mean(1)
        rmse = np.sqrt(squared_b[idx].mean(1)) - np.sqrt(squared_a[idx].mean(1))
        differences.append((accuracy, rmse))
        per_pair.append({"accuracy": round(float(right_b.mean() - right_a.mean()), 4),
                         "accuracy_interval": interval(accuracy),
                         "rmse": round(float(np.sqrt(squared_b.mean()) - np.sqrt(squared_a.mean())), 4),
                         "rmse_interval": interval(rmse),
                         "only_a_right": int(np.sum((right_a == 1) & (right_b == 0))),
                         "only_b_right": int(np.sum((right_b == 1) & (right_a == 0)))})
    result = {"photos": len(paths), "pairs": per_pair}
    if len(pairs) > 1:
        mean_accuracy, mean_rmse = (np.mean([d[k] for d in differences], axis=0) for k in (0, 1))
        result["mean"] = {"accuracy": round(float(np.mean([p["accuracy"] for p in per_pair])), 4),
                          "accuracy_interval": interval(mean_accuracy),
                          "rmse": round(float(np.mean([p["rmse"] for p in per_pair])), 4),
                          "rmse_interval": interval(mean_rmse)}
    return result


def offset(rows: list[dict], oof: list[Path]) -> dict:
    """The expected count of each CSV row's p1..p5, against the mean of the out-of-fold sources'
    (with TTA) for the same photo; every row's photo must be in them, with the same count."""
    import real_blend_cv  # a sibling; it brings torch, which the other commands do without

    sources = [real_blend_cv.oof_source(path, "flips") for path in oof]
    first = sources[0]
    blend = np.mean([real_blend_cv.aligned(s, first).numpy() for s in sources], axis=0)
    where = {key: i for i, key in enumerate(first.photos)}
    counts = np.arange(1, real_blend_cv.K + 1)
    if rows and not all(f"p{c}" in rows[0] for c in counts):
        raise ValueError("the CSV has no p1..p5 columns: write it with invmon predict --out")
    answered = [row for row in rows if not row.get("error")]  # a photo the model could not read has no p1..p5
    if not answered:
        raise ValueError("the CSV answers no photo")
    truth, _ = truth_and_answers(answered)
    model, cv = [], []
    for row, count in zip(answered, truth):
        key = real_blend_cv.photo_key(row["path"])
        if key not in where:
            raise ValueError(f"{key} has no out-of-fold answer in {oof[0].name}")
        if count != int(first.labels[where[key]]) + 1:
            raise ValueError(f"{key} is labelled {int(first.labels[where[key]]) + 1} in {oof[0].name}")
        model.append(float(np.dot([float(row[f"p{c}"]) for c in counts], counts)))
        cv.append(float(blend[where[key]] @ counts))
    model, cv = np.array(model), np.array(cv)
    difference = model - cv
    return {"photos": len(answered), "errors": len(rows) - len(answered), "sources": len(oof),
            "difference": round(float(difference.mean()), 4),
            "standard_error": (round(float(difference.std(ddof=1) / np.sqrt(len(answered))), 4)
                               if len(answered) > 1 else None),
            "per_count": {str(c): {"photos": int(np.sum(truth == c)),
                                   "model": round(float(model[truth == c].mean()), 3),
                                   "cv": round(float(cv[truth == c].mean()), 3)} for c in sorted(set(truth))}}


def read(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def predict(artifact: Path, photos: list[Path], settings: dict, batch: int = 16) -> list[dict]:
    """Bulk-CSV rows for `photos` from the artifact's own serving code, loaded as the local
    endpoint loads it, its model_config.json's settings updated with `settings`."""
    from pipeline.serving.endpoint import load_model

    loaded = load_model(artifact)
    loaded.model["config"].update(settings)
    served, rows = loaded.inference, []
    for start in range(0, len(photos), batch):
        chunk = photos[start:start + batch]
        counted = served.predict_fn([served.input_fn(p.read_bytes(), "image/jpeg") for p in chunk], loaded.model)
        rows += [{"path": str(p), "count": str(a["count"])} for p, a in zip(chunk, counted)]
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("split", help="write out/rest/<count>/ and out/locked/<count>/")
    make.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "abid-sample")
    make.add_argument("--out", type=Path, default=ROOT / "build" / "locked")
    scored = commands.add_parser("score", help="accuracy, RMSE and per-count accuracy of a bulk CSV")
    scored.add_argument("csv", type=Path)
    compared = commands.add_parser("compare", help="B minus A on the same photos, for pairs of bulk CSVs")
    compared.add_argument("csvs", type=Path, nargs="+", metavar="A.csv B.csv")
    predicted = commands.add_parser("predict", help="a bulk CSV of the locked part from an artifact, a setting changed")
    predicted.add_argument("artifact", type=Path)
    predicted.add_argument("--photos", type=Path, default=ROOT / "build" / "locked" / "locked")
    predicted.add_argument("--tta", choices=("none", "flips", "crops", "flips+crops"), required=True)
    predicted.add_argument("--out", type=Path, required=True)
    offsets = commands.add_parser("offset", help="a bulk CSV's expected counts against the CV's out-of-fold answers")
    offsets.add_argument("csv", type=Path, help="an invmon predict CSV (with p1..p5)")
    offsets.add_argument("oof", type=Path, nargs="+", help="real_finetune_cv.py --oof files of the same photos")
    args = parser.parse_args()
    if args.command == "offset":
        try:
            print(json.dumps(offset(read(args.csv), args.oof), indent=1))
        except (OSError, KeyError, ValueError) as exc:
            print(f"locked_split: {exc}", file=sys.stderr)
            return 1
        return 0
    if args.command == "predict":
        photos = sorted(args.photos.glob("*/*.jpg"))
        if not photos:
            print(f"locked_split: no <count>/*.jpg photos under {args.photos}", file=sys.stderr)
            return 1
        rows = predict(args.artifact, photos, {"tta": args.tta})
        with open(args.out, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["path", "count"])
            writer.writeheader()
            writer.writerows(rows)
        print(json.dumps(score(rows), indent=1))
        return 0
    if args.command == "compare":
        if len(args.csvs) % 2:
            parser.error("compare takes pairs of CSVs: A.csv B.csv [A2.csv B2.csv ...]")
        try:
            paired = [(read(a), read(b)) for a, b in zip(args.csvs[::2], args.csvs[1::2])]
            print(json.dumps(compare(paired), indent=1))
        except (OSError, KeyError, ValueError) as exc:
            print(f"locked_split: {exc}", file=sys.stderr)
            return 1
        return 0
    if args.command == "split":
        try:
            print(json.dumps(locked.write(args.data, args.out)))
        except (OSError, ValueError) as exc:
            print(f"locked_split: {exc}", file=sys.stderr)
            return 1
        return 0
    print(json.dumps(score(read(args.csv)), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
