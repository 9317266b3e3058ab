"""Blends of counting models on the real sample, scored on the same 5 folds as everything else.

    python benchmarks/real_blend_cv.py [--frozen 224 260_lite2 ...] [--weight-decay 0.2] [--fold-seed 0]
                                       [--oof DIR/ft320-e20-s0.json ...] [--tta flips] [--largest 3]
                                       [--recall-floor 0.2] [--out blends.json] [--save DIR]

Each source gives every photo of the 1,731 its class probabilities from a model that did not
train on it (out of fold):
  --frozen SPEC   train.py's frozen-backbone head (ordinal, class-balanced, weight decay 0.2 unless
                  --weight-decay; benchmarks/real_cv.py trains it with the trainer's own parts) on
                  the first two views (the photo, its mirror image) of
                  benchmarks/real_features.py's features_<SPEC>.pt, fold by fold here (seconds)
  --oof FILE      what benchmarks/real_finetune_cv.py --oof wrote (fine-tuned on a GPU), with
                  or without its flip TTA (--tta), or what --save wrote for a frozen source
Every source alone, and the mean of the probabilities of every combination of up to --largest
sources, is decoded two ways: median (the count where the cumulative probability reaches 1/2,
the profiles' default) and mean (the rounded expected count, what RMSE rewards), and with
--recall-floor a third way: mean with the end cuts fitted on another fold (train.py --recall_floor).
Prints accuracy and RMSE, mean +- standard deviation over the folds, per-class accuracy and the
lowest fold's count 1 and count 5, best RMSE first.
A blend costs nothing to score: the probabilities are fixed before any of this runs, and a blend
is their plain mean, so nothing here is fitted to a held-out photo. Choosing the best of many
rows is still a choice made on these folds: read a difference smaller than the fold spread as noise.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import inference
import real_cv  # a sibling: the folds, and the frozen head trained fold by fold
import torch
from inference import decode_counts  # the decoding the trainer validates with and the endpoint serves
from trainer.heads import scores
from trainer.optim import FROZEN_WEIGHT_DECAY

K = real_cv.K
# train.py --freeze_backbone's head: ordinal, median decoding, class-balanced, on 2 views of each photo.
FROZEN_HEAD = {**real_cv.SHARED, "head": "ordinal", "decode": "median", "train_views": 2, "tta": False}


def photo_key(path: str) -> str:
    """"<count>/<file name>": the same photo whichever machine or folder its source ran from."""
    return "/".join(Path(path).parts[-2:])


@dataclass
class Source:
    """One model's out-of-fold class probabilities [N, K] for N photos, and each photo's fold."""
    name: str
    photos: list[str]
    labels: torch.Tensor
    folds: torch.Tensor
    probabilities: torch.Tensor


def fold_ids(masks: list[torch.Tensor]) -> torch.Tensor:
    """real_cv.folds' boolean masks -> the fold number of each photo."""
    ids = torch.full_like(masks[0], -1, dtype=torch.long)
    for number, mask in enumerate(masks):
        ids[mask] = number
    return ids


def frozen_source(features_dir: Path, spec: str, head: dict, fold_seed: int) -> Source:
    features = torch.load(features_dir / f"features_{spec}.pt", weights_only=False)
    x, y = features["avg"].float(), features["labels"]
    return Source(f"frozen {spec}", [photo_key(p) for p in features["paths"]], y,
                  fold_ids(real_cv.folds(y, seed=fold_seed)), real_cv.out_of_fold(x, y, head, fold_seed))


def write_out_of_fold(path: Path, name: str, settings: dict, photos: list[str], labels: torch.Tensor,
                      folds: torch.Tensor, probabilities: dict[str, torch.Tensor]) -> None:
    """One source's out-of-fold probabilities as JSON (about 100 KB; null for a photo whose fold
    was not run), with or without TTA: what --oof reads, whichever machine wrote it. Rounded to 5
    decimals, so a blend read back can decode a photo on a knife edge the other way (seen once in
    30 rows: RMSE 1.1791 against 1.1784 in memory)."""
    def rows(values: torch.Tensor) -> list:
        return [None if row.isnan().any() else [round(float(v), 5) for v in row] for row in values]

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"name": name, "settings": settings, "photos": [photo_key(p) for p in photos],
                                "labels": labels.tolist(), "folds": folds.tolist(),
                                "probabilities": {tta: rows(v) for tta, v in probabilities.items()}}))


def tta_suffix(tta: str) -> str:
    """How a score or source names its TTA setting: "+tta" for the flips (the older files' name)."""
    return {"none": "", "flips": "+tta"}.get(tta, f"+{tta}")


def oof_source(path: Path, tta: str) -> Source:
    saved = json.loads(path.read_text())
    available = saved["probabilities"]
    if tta not in available and list(available) == ["none"]:
        tta = "none"  # a source without TTA (a frozen head): the photo as is
    if tta not in available:
        raise SystemExit(f"{path} holds no probabilities with TTA {tta!r} (it has {list(available)})")
    rows = [row if row is not None else [math.nan] * K for row in available[tta]]
    return Source(saved["name"] + tta_suffix(tta), saved["photos"], torch.tensor(saved["labels"]),
                  torch.tensor(saved["folds"]), torch.tensor(rows, dtype=torch.float32))


def aligned(source: Source, first: Source) -> torch.Tensor:
    """`source`'s probabilities in `first`'s photo order, once it is checked to be the same
    photos, labels and folds (a blend of models scored on other folds would be no blend)."""
    order = {key: i for i, key in enumerate(source.photos)}
    missing = [key for key in first.photos if key not in order]
    if missing:
        raise SystemExit(f"{source.name} has no probabilities for {len(missing)} photos (e.g. {missing[0]})")
    index = torch.tensor([order[key] for key in first.photos])
    if not torch.equal(source.labels[index], first.labels):
        raise SystemExit(f"{source.name} labels the same photos differently from {first.name}")
    if not torch.equal(source.folds[index], first.folds):
        raise SystemExit(f"{source.name} was made on other folds than {first.name} (see --fold-seed)")
    return source.probabilities[index]


def cross_validated(probabilities: torch.Tensor, labels: torch.Tensor, folds: torch.Tensor, how: str,
                    floor: float = 0.0, fit_probabilities: torch.Tensor | None = None) -> dict:
    """Accuracy and RMSE of each fold's held-out photos: the fold spread, as the other tables have it.
    A fold with a photo that has no probabilities (a run cut short) is left out. With `floor`
    (mean decoding), each fold is decoded with the cuts inference.floor_cuts fits on the next fold,
    as Train fits them on its one validation split: 346 photos of another model's held-out output;
    on `fit_probabilities` there where given (the same models' answers over other views)."""
    fit_probabilities = probabilities if fit_probabilities is None else fit_probabilities
    numbers = [f for f in folds.unique().tolist() if f >= 0]
    scored = []
    for i, number in enumerate(numbers):
        test, fit = folds == number, folds == numbers[(i + 1) % len(numbers)]
        if probabilities[test].isnan().any():
            continue
        cuts = inference.floor_cuts(fit_probabilities[fit], labels[fit], floor) if floor else None
        scored.append(scores(decode_counts(probabilities[test], how, cuts), labels[test]))
    if not scored:
        raise SystemExit("no fold has probabilities for every one of its photos")
    acc, rmse = [s["accuracy"] for s in scored], [s["rmse"] for s in scored]
    spread = (lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)
    return {"accuracy": statistics.mean(acc), "accuracy_sd": spread(acc), "rmse": statistics.mean(rmse),
            "rmse_sd": spread(rmse), "folds": len(scored),
            "per_class": [statistics.mean(s["per_class"][c] for s in scored) for c in range(K)],
            "lowest_fold": [min(s["per_class"][c] for s in scored) for c in range(K)]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--features", type=Path, default=Path("/tmp/invmon-features"))
    p.add_argument("--frozen", nargs="*", default=[], metavar="SPEC",
                   help="features_<SPEC>.pt of benchmarks/real_features.py, e.g. 224 or 260_lite2")
    p.add_argument("--weight-decay", type=float, default=FROZEN_WEIGHT_DECAY, help="the frozen heads' weight decay")
    p.add_argument("--fold-seed", type=int, default=0,
                   help="other folds than every table's (0) for the frozen heads, to check that a blend's lead "
                        "is not these folds' luck (--oof files must come from the same folds: real_finetune_cv.py "
                        "--fold-seed)")
    p.add_argument("--oof", nargs="*", default=[], type=Path, metavar="FILE",
                   help="out-of-fold probabilities from benchmarks/real_finetune_cv.py --oof, or from --save")
    p.add_argument("--tta", default="flips", choices=("none", "flips"), help="which of an --oof file's probabilities")
    p.add_argument("--largest", type=int, default=3, help="blend at most this many sources")
    p.add_argument("--recall-floor", type=float, default=0.0, metavar="F",
                   help="also score mean decoding with the end cuts moved to this recall (train.py "
                        "--recall_floor), fitted on the next fold")
    p.add_argument("--out", type=Path, default=None, help="write every row as JSON here")
    p.add_argument("--save", type=Path, default=None, metavar="DIR",
                   help="also write each --frozen source's probabilities to DIR/frozen-<SPEC>-wd-<DECAY>.json "
                        "(to blend later with --oof, without the feature files)")
    args = p.parse_args()
    torch.set_num_threads(2)

    loaded: list[Source] = []
    for spec in args.frozen:
        head = {**FROZEN_HEAD, "weight_decay": args.weight_decay}
        loaded.append(frozen_source(args.features, spec, head, args.fold_seed))
        if args.save:
            s = loaded[-1]
            write_out_of_fold(args.save / f"frozen-{spec}-wd-{args.weight_decay:g}-folds{args.fold_seed}.json",
                              f"frozen {spec} wd {args.weight_decay:g}", {**head, "features": spec},
                              s.photos, s.labels, s.folds, {"none": s.probabilities})
    loaded += [oof_source(path, args.tta) for path in args.oof]
    if not loaded:
        p.error("name at least one source (--frozen or --oof)")
    first = loaded[0]
    sources = {source.name: aligned(source, first) for source in loaded}

    rows = []
    for n in range(1, min(args.largest, len(sources)) + 1):
        for combo in itertools.combinations(sources, n):
            blended = torch.stack([sources[name] for name in combo]).mean(0)
            for how in ("median", "mean"):
                rows.append({"sources": list(combo), "decode": how,
                             **cross_validated(blended, first.labels, first.folds, how)})
            if args.recall_floor:
                rows.append({"sources": list(combo), "decode": f"floor{args.recall_floor:g}",
                             **cross_validated(blended, first.labels, first.folds, "mean", args.recall_floor)})
    rows.sort(key=lambda r: r["rmse"])
    width = max(len(" + ".join(r["sources"])) for r in rows)
    print(f"{'sources':<{width}}  decode    accuracy         RMSE             per class 1..5   lowest fold 1, 5  "
          f"({len(first.photos)} photos, {rows[0]['folds']} folds)")
    for r in rows:
        print(f"{' + '.join(r['sources']):<{width}}  {r['decode']:<8}  {r['accuracy']:.3f} +- {r['accuracy_sd']:.3f}  "
              f"{r['rmse']:.3f} +- {r['rmse_sd']:.3f}  " + " ".join(f"{v:.2f}" for v in r["per_class"])
              + f"   {r['lowest_fold'][0]:.2f} {r['lowest_fold'][-1]:.2f}")
    labels = first.labels
    majority = scores(torch.full_like(labels, int(torch.bincount(labels, minlength=K).argmax())), labels)
    print(f"majority class: accuracy {majority['accuracy']:.3f}, RMSE {majority['rmse']:.3f}")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
