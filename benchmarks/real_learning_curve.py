"""How the `real` recipe's cross-validated score grows with the number of training photos.

    python benchmarks/real_finetune_cv.py --data build/locked/rest --configs ft224-last2-cached-4v-bb05-crops \\
        --epochs 12 --seed 2 --train-fraction 0.5 --oof build/locked/oof11 --cache build/locked/cache   # 0.25, 0.75
    python benchmarks/real_learning_curve.py build/locked/oof11/*.json \\
        docs/measurements/rest/variants/ft224-last2-cached-4v-bb05-crops-e12-s[23].json [--out curve.json]

Each --oof file is one seed's tail, cross-validated on the rest of the sample (5 folds) with its
folds' training photos cut to a share (`train_fraction` in its settings; 1 when absent). For each
share, the seeds that every share has are scored as real_choose_cv.py scores a setting: one tail
over the 4 flips with plain rounding (the model alone), and the served setting (three seeds' tails
averaged, or as many as there are, the 4 flips and 5 crops, the 0.25 floor). A line through accuracy and RMSE against the
log of the training photos gives the gain per doubling, and where that line would reach issue 27's
goal: an extrapolation, to be read as an order of magnitude.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import real_choose_cv  # a sibling: the sources, and a setting scored as the choice scores it

GOAL_ACCURACY, GOAL_RMSE = 0.37, 1.10  # issue 27, on the locked part


def curve_settings(seeds: int) -> dict[str, dict]:
    """The model alone, and as the profile serves it (up to its three tails)."""
    tails = min(3, seeds)
    return {"one tail, flips, rounding": {"tails": 1, "tta": "flips", "floor": 0.0},
            f"{tails} tails, flips+crops, floor 0.25": {"tails": tails, "tta": "flips+crops", "floor": 0.25}}


def by_share(paths: list[Path]) -> dict[float, dict[int, Path]]:
    """The files grouped by training share, each group by seed."""
    groups: dict[float, dict[int, Path]] = {}
    for path in paths:
        settings = json.loads(path.read_text()).get("settings")
        if not settings or "seed" not in settings:
            raise SystemExit(f"{path} is not a real_finetune_cv.py --oof file (no settings with a seed)")
        groups.setdefault(float(settings.get("train_fraction", 1.0)), {})[int(settings["seed"])] = path
    return dict(sorted(groups.items()))


def photos_needed(points: list[tuple[float, float]], goal: float, higher_is_better: bool = True) -> tuple[float, float]:
    """The least-squares line y = a + b * log2(photos) through (photos, y): its gain per doubling
    b, and the photos at which it reaches `goal` (inf where more photos move it away)."""
    fit = statistics.linear_regression([math.log2(n) for n, _ in points], [y for _, y in points])
    improving = fit.slope > 0 if higher_is_better else fit.slope < 0
    if not improving:
        return fit.slope, math.inf
    return fit.slope, 2 ** min((goal - fit.intercept) / fit.slope, 60.0)  # past 2**60: never


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("oof", nargs="+", type=Path, help="real_finetune_cv.py --oof files of the *-crops configuration")
    p.add_argument("--out", type=Path, default=None, help="write every row and fit as JSON here")
    args = p.parse_args()
    groups = by_share(args.oof)
    seeds = sorted(set.intersection(*(set(g) for g in groups.values())))
    if not seeds or len(groups) < 2:
        p.error("need at least two training shares with a seed in common")
    rows, curves = [], {}
    for share, files in groups.items():
        first, sources = real_choose_cv.load_sources([files[s] for s in seeds], ["flips", "flips+crops"])
        # a fold trains on the other four fifths of the photos, cut to the share
        photos = round(share * len(first.photos) * 4 / 5)
        for name, setting in curve_settings(len(seeds)).items():
            row = {"setting": name, "train_fraction": share, "training_photos": photos,
                   **real_choose_cv.score_setting(setting, sources, first.labels, first.folds)}
            rows.append(row)
            curves.setdefault(name, []).append(row)
    print(f"{len(first.photos)} photos, 5 folds, seeds {seeds}; mean over the seeds (one tail) or their blend")
    print("setting                            training photos  accuracy  RMSE   per count 1..5")
    for r in rows:
        print(f"{r['setting']:<35}  {r['training_photos']:>15}  {r['accuracy']:.3f}     {r['rmse']:.3f}  "
              + " ".join(f"{v:.2f}" for v in r["per_class"]))
    fits = {}
    for name, points in curves.items():
        gain, for_accuracy = photos_needed([(r["training_photos"], r["accuracy"]) for r in points], GOAL_ACCURACY)
        drop, for_rmse = photos_needed([(r["training_photos"], r["rmse"]) for r in points], GOAL_RMSE,
                                        higher_is_better=False)
        fits[name] = {"accuracy_per_doubling": gain, "rmse_per_doubling": drop,  # null: never, on that line
                      "photos_for_accuracy": None if math.isinf(for_accuracy) else for_accuracy,
                      "photos_for_rmse": None if math.isinf(for_rmse) else for_rmse}
        print(f"{name}: accuracy {gain:+.3f} and RMSE {drop:+.3f} per doubling of the photos; the line reaches "
              f"{GOAL_ACCURACY} at {for_accuracy:,.0f} and RMSE {GOAL_RMSE} at {for_rmse:,.0f} training photos")
    if args.out:
        args.out.write_text(json.dumps({"seeds": seeds, "rows": rows, "fits": fits,
                                        "files": [p.name for p in args.oof]}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
