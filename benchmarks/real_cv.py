"""5-fold cross-validation of train.py's counting head on frozen pretrained features of the real sample.

    python benchmarks/real_cv.py [--features /tmp/invmon-features] [--sizes 224 320] [--out FILE]

Reads benchmarks/real_features.py's output. Every configuration is scored on the same 5 folds
(stratified by count, seed 0): trained on 4/5 of the 1,731 photos, scored on the held-out 1/5.
Each fold trains what `train.py --freeze_backbone true` trains, with its own parts (the trainer
package): the head (classify: 5-way softmax; ordinal: one score and ordered thresholds) on
features standardised on the training folds, its loss, optimizer, lr schedule and epoch loop,
and the held-out fold scored as its validation split is, then decoded as the endpoint decodes.
Options per configuration, as train.py arguments: class-balanced loss weights, training on 1,
2 or 4 flip views of each photo, test-time averaging over the 4 flips (TTA), decoding (argmax,
median or mean), weight decay, pooled features (avg, avg and max, every stage). Prints one line
per configuration, mean and standard deviation over the folds of accuracy and RMSE, and writes
them all as JSON.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import time
from pathlib import Path

import inference
import torch
from trainer.args import parse_args
from trainer.data import LABELS
from trainer.distributed import Place
from trainer.epoch import evaluate
from trainer.frozen import head_on_features
from trainer.heads import scores
from trainer.loop import Session, seed_everything, train_epochs

K = len(LABELS)
# The frozen recipe's settings that every configuration shares (train.py's defaults otherwise:
# SGD with momentum, cosine schedule, weight decay 0.2 on the head's weights).
SHARED = {"pool": "avg", "balanced": True, "train_views": 4, "tta": True, "decode": "argmax", "weight_decay": "auto",
          "optimizer": "sgd", "lr": 0.01, "epochs": 30, "batch_size": 64}


def folds(labels: torch.Tensor, n: int = 5, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    assignment = torch.empty_like(labels)
    for c in range(K):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        assignment[idx] = torch.arange(len(idx)) % n
    return [assignment == f for f in range(n)]


def train_arguments(cfg: dict) -> list[str]:
    """The train.py arguments of a configuration (its pool and views pick the features given)."""
    return ["--arch", "efficientnet_lite0", "--freeze_backbone", "true", "--head", cfg["head"],
            "--decode", cfg["decode"], "--class_weights", "balanced" if cfg["balanced"] else "none",
            "--tta", "flips" if cfg["tta"] else "none", "--weight_decay", str(cfg["weight_decay"]),
            "--optimizer", cfg["optimizer"], "--lr", str(cfg["lr"]), "--epochs", str(cfg["epochs"]),
            "--batch_size", str(cfg["batch_size"]), "--keep_epoch", "last"]


def held_out(x: torch.Tensor, cfg: dict) -> torch.Tensor:
    """What the trainer validates on: every view of each photo with TTA (the head's outputs
    averaged), else the photo alone."""
    return x if cfg["tta"] else x[:, 0]


def fit_head(x: torch.Tensor, y: torch.Tensor, train: torch.Tensor, test: torch.Tensor,
             cfg: dict) -> tuple[torch.nn.Module, torch.Tensor]:
    """train.py's frozen-backbone head trained on the first cfg["train_views"] views of the
    `train` photos of x [N, V, D], validated on the `test` photos every epoch as train.py
    validates; returns (the trained head, the `test` photos' class probabilities of the last epoch)."""
    args = parse_args(train_arguments(cfg))
    place = Place()
    seed_everything(args.seed)
    head = inference.make_head(args.head, x.shape[-1], K)
    fit, train_loader, val_loader = head_on_features(head, x[train][:, :cfg["train_views"]], y[train].tolist(),
                                                     held_out(x[test], cfg), y[test].tolist(), args, place)
    with contextlib.redirect_stdout(io.StringIO()):  # the loop's lines: an epoch line per fold and epoch
        best, _ = train_epochs(Session(args, place, train_loader, val_loader, y[train].tolist()), head, fit, None)
    return fit, best["outputs"][0]


def probabilities(fit: torch.nn.Module, x: torch.Tensor, cfg: dict) -> torch.Tensor:
    """A trained head's class probabilities of more photos' features [N, V, D], computed as the
    trainer scores its validation split."""
    args = parse_args(train_arguments(cfg))
    data = torch.utils.data.TensorDataset(held_out(x, cfg), torch.zeros(len(x), dtype=torch.long))
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size)
    return evaluate(fit, loader, len(loader), Place(), None, args.head, args.decode)["outputs"][0]


def fit_and_score(x: torch.Tensor, y: torch.Tensor, test: torch.Tensor, cfg: dict) -> dict:
    """x: [N, V, D] features in V views. Returns accuracy, RMSE and per-class accuracy on `test`."""
    _, held_out_probabilities = fit_head(x, y, ~test, test, cfg)
    return scores(inference.decode_counts(held_out_probabilities, cfg["decode"]), y[test])


def out_of_fold(x: torch.Tensor, y: torch.Tensor, cfg: dict, seed: int = 0) -> torch.Tensor:
    """[N, K] class probabilities of every photo from the head trained on the other 4 folds
    (`seed` picks the folds: 0 is every table's)."""
    result = torch.empty(len(y), K)
    for test in folds(y, seed=seed):
        result[test] = fit_head(x, y, ~test, test, cfg)[1]
    return result


def run(features: dict, cfg: dict) -> dict:
    y = features["labels"]
    if cfg["pool"] == "avg":
        x = features["avg"].float()
    elif cfg["pool"] == "avgmax":
        x = torch.cat([features["avg"].float(), features["max"].float()], -1)
    else:  # "stages": every stage's mean and max, the last map's 2x2 grid
        x = features["stages"].float()
    results = [fit_and_score(x, y, test, cfg) for test in folds(y)]
    acc = [s["accuracy"] for s in results]
    rmse = [s["rmse"] for s in results]
    per_class = [statistics.mean(s["per_class"][c] for s in results) for c in range(K)]
    return {**cfg, "accuracy_mean": statistics.mean(acc), "accuracy_std": statistics.stdev(acc),
            "rmse_mean": statistics.mean(rmse), "rmse_std": statistics.stdev(rmse),
            "per_class_accuracy": per_class, "folds_accuracy": acc, "folds_rmse": rmse}


def show(r: dict) -> str:
    pc = " ".join(f"{a:.2f}" for a in r["per_class_accuracy"])
    return (f"{r['size']:>3}px {r['pool']:<7} {r['head']:<8} bal={int(r['balanced'])} aug={r['train_views']} "
            f"tta={int(r['tta'])} dec={r['decode']:<6} wd={r['weight_decay']:<5} {r['optimizer']} lr={r['lr']:<5} "
            f"acc {r['accuracy_mean']:.3f}+-{r['accuracy_std']:.3f} rmse {r['rmse_mean']:.3f}+-{r['rmse_std']:.3f} "
            f"per-class [{pc}]")


def grid(name: str) -> list[dict]:
    """The configurations of a --grid, each a change to SHARED."""
    configs = [{**SHARED, "head": head, "decode": decode}
               for head in ("classify", "ordinal") for decode in ("argmax", "median", "mean")]
    if name == "main":
        for head in ("classify", "ordinal"):
            one = {**SHARED, "head": head, "decode": "median" if head == "ordinal" else "argmax"}
            configs += [{**one, "balanced": False}, {**one, "tta": False}, {**one, "train_views": 1, "tta": False},
                        {**one, "weight_decay": 2.0}, {**one, "weight_decay": 0.02}, {**one, "pool": "avgmax"}]
    if name == "decay":
        configs = [{**SHARED, "pool": pool, "head": head, "decode": decode, "weight_decay": decay}
                   for pool in ("avg", "stages") for decay in (0.002, 0.02, 0.2)
                   for head, decode in (("classify", "argmax"), ("ordinal", "median"), ("ordinal", "mean"))]
    if name == "final":  # the frozen recipe (train.py --freeze_backbone's defaults) and its neighbours
        one = {**SHARED, "head": "ordinal", "decode": "median", "train_views": 2, "tta": False}
        configs = [{**one, "weight_decay": decay} for decay in (0.06, 0.2, 0.6, 2.0)]
        configs += [{**one, "decode": "mean"}, {**one, "decode": "argmax"},
                    {**one, "head": "classify", "decode": "argmax"}, {**one, "balanced": False},
                    {**one, "train_views": 1}, {**one, "train_views": 4}, {**one, "train_views": 4, "tta": True}]
    if name == "backbones":  # one backbone/resolution against another: the leading heads
        one = {**SHARED, "head": "ordinal", "decode": "median", "train_views": 2, "tta": False}
        configs = [{**one, "weight_decay": decay} for decay in (0.2, 0.6, 2.0)]
        configs += [{**one, "decode": "mean", "weight_decay": decay} for decay in (0.2, 0.6)]
        configs += [{**one, "tta": True}, {**one, "decode": "mean", "tta": True},
                    {**one, "head": "classify", "decode": "argmax"}]
    return [c for i, c in enumerate(configs) if c not in configs[:i]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--features", type=Path, default=Path("/tmp/invmon-features"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 320])
    parser.add_argument("--grid", default="main", choices=("main", "quick", "decay", "final", "backbones"),
                        help="quick: the heads and decodings alone")
    parser.add_argument("--tag", default="", help="features_<size><tag>.pt")
    parser.add_argument("--concat", nargs="*", default=[], metavar="SIZE+TAG",
                        help="also concatenate these feature files' avg features (e.g. 320_lite2): "
                             "frozen features of several backbones or resolutions side by side")
    parser.add_argument("--skip", type=int, default=0, help="skip the grid's first N configurations")
    parser.add_argument("--out", type=Path, default=Path("/tmp/invmon-features/cv.json"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for size in args.sizes:
        path = args.features / f"features_{size}{args.tag}.pt"
        if not path.exists():
            print(f"{path} missing: skipped", file=sys.stderr)
            continue
        features = torch.load(path, weights_only=False)
        for other in args.concat:
            extra = torch.load(args.features / f"features_{other}.pt", weights_only=False)
            if extra["paths"] != features["paths"]:
                raise SystemExit(f"features_{other}.pt is of other photos than {path.name}")
            views = min(features["avg"].shape[1], extra["avg"].shape[1])
            features = {**features, "avg": torch.cat([features["avg"][:, :views], extra["avg"][:, :views]], -1)}
        available = features["avg"].shape[1]
        configs = [{**c, "train_views": min(c["train_views"], available)} for c in grid(args.grid)[args.skip:]]
        for cfg in configs:
            started = time.perf_counter()
            r = run(features, {**cfg, "size": size})
            r["seconds"] = round(time.perf_counter() - started, 1)
            results.append(r)
            print(show(r), flush=True)
    args.out.write_text(json.dumps(results, indent=1))
    # Majority-class baseline on the same folds.
    y = features["labels"]
    accs = []
    for test in folds(y):
        majority = torch.bincount(y[~test], minlength=K).argmax()
        accs.append(float((y[test] == majority).float().mean()))
    print(f"majority-class baseline: accuracy {statistics.mean(accs):.3f}+-{statistics.stdev(accs):.3f}")


if __name__ == "__main__":
    main()
