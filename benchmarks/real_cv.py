"""5-fold cross-validation of counting heads on frozen pretrained features of the real sample.

    python benchmarks/real_cv.py [--features /tmp/invmon-features] [--sizes 224 320] [--out FILE]

Reads benchmarks/real_features.py's output. Every configuration is scored on the same 5 folds
(stratified by count, seed 0): trained on 4/5 of the 1,731 photos, scored on the held-out 1/5.
Heads (linear on the 1280 features, standardised on the training folds, full-batch AdamW):
  classify    5-way softmax, cross-entropy
  ordinal     cumulative logits, one score and ordered thresholds, CORAL binary cross-entropy
  regression  one output, squared error on the count, rounded and clipped to 1-5
Options per configuration: class-balanced loss weights, training on the 4 flip views
(augmentation), test-time averaging over the 4 flips (TTA), decoding (argmax or median), weight
decay, pooled features (avg, or avg and max). Prints one line per configuration, mean and
standard deviation over the folds of accuracy and RMSE, and writes them all as JSON.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

K = 5


def folds(labels: torch.Tensor, n: int = 5, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    assignment = torch.empty_like(labels)
    for c in range(K):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        assignment[idx] = torch.arange(len(idx)) % n
    return [assignment == f for f in range(n)]


class Ordinal(torch.nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.score = torch.nn.Linear(d, 1)
        self.first = torch.nn.Parameter(torch.tensor([-1.5]))
        self.gaps = torch.nn.Parameter(torch.full((K - 2,), 0.5413))

    def forward(self, x):
        t = torch.cat([self.first, self.first + torch.cumsum(torch.nn.functional.softplus(self.gaps), 0)])
        return self.score(x) - t


def make_head(head: str, d: int, hidden: int) -> torch.nn.Module:
    out = {"classify": K, "regression": 1}.get(head)
    last = Ordinal(hidden or d) if head == "ordinal" else torch.nn.Linear(hidden or d, out)
    if hidden:
        return torch.nn.Sequential(torch.nn.Dropout(0.2), torch.nn.Linear(d, hidden), torch.nn.ReLU(),
                                   torch.nn.Dropout(0.2), last)
    return last


def loss_fn(head: str, out: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    if head == "classify":
        per = torch.nn.functional.cross_entropy(out, y, reduction="none")
    elif head == "ordinal":
        above = (y[:, None] > torch.arange(K - 1)[None, :]).float()
        per = torch.nn.functional.binary_cross_entropy_with_logits(out, above, reduction="none").sum(1)
    else:
        per = (out[:, 0] - y.float()) ** 2
    if w is None:
        return per.mean()
    ww = w[y]
    return (per * ww).sum() / ww.sum()


def probabilities(head: str, out: torch.Tensor) -> torch.Tensor:
    if head == "classify":
        return torch.softmax(out, 1)
    if head == "ordinal":
        above = torch.sigmoid(out)
        cum = torch.cat([torch.ones_like(above[:, :1]), above, torch.zeros_like(above[:, :1])], 1)
        return (cum[:, :-1] - cum[:, 1:]).clamp_min(0)
    raise ValueError(head)


def predict(head: str, out: torch.Tensor, decode: str) -> torch.Tensor:
    if head == "regression":
        return out[:, 0].round().clamp(0, K - 1).long()
    p = probabilities(head, out)
    if decode == "mean":  # the expected count, rounded
        return (p * torch.arange(K)).sum(1).round().long()
    if decode == "median":
        return (p.cumsum(1) < 0.5).sum(1).clamp_max(K - 1)
    return p.argmax(1)


def fit_head(x: torch.Tensor, y: torch.Tensor, train: torch.Tensor, cfg: dict):
    """Train a head on the first cfg["train_views"] views of the `train` photos of x [N, V, D];
    returns head([n, V', D]) -> the head's outputs (view 0, or the mean over the views with TTA)."""
    torch.manual_seed(0)
    xtr = x[train][:, :cfg["train_views"]]
    mean = xtr.reshape(-1, x.shape[-1]).mean(0)
    std = xtr.reshape(-1, x.shape[-1]).std(0) + 1e-6
    xtr = ((xtr - mean) / std).reshape(-1, x.shape[-1])
    ytr = y[train].repeat_interleave(cfg["train_views"])
    w = None
    if cfg["balanced"]:
        counts = torch.bincount(y[train], minlength=K).float()
        w = counts.sum() / (K * counts)
    model = make_head(cfg["head"], x.shape[-1], cfg["hidden"])
    if cfg["head"] == "regression" and not cfg["hidden"]:
        with torch.no_grad():
            model.bias.fill_(float(ytr.float().mean()))
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["wd"])
    steps = cfg["steps"]
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    batch = 256
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(xtr), (batch,), generator=g)
        loss = loss_fn(cfg["head"], model(xtr[idx]), ytr[idx], w)
        if cfg.get("l2"):
            loss = loss + cfg["l2"] * sum((p ** 2).sum() for p in weights)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()

    @torch.no_grad()
    def head(xte: torch.Tensor) -> torch.Tensor:
        xte = (xte - mean) / std
        views = xte.shape[1] if cfg["tta"] else 1  # TTA: the mean over every extracted flip view
        return torch.stack([model(xte[:, v]) for v in range(views)]).mean(0)

    return head


def score(pred: torch.Tensor, yte: torch.Tensor) -> dict:
    per_class = [float((pred[yte == c] == c).float().mean()) for c in range(K)]
    return {"accuracy": float((pred == yte).float().mean()),
            "rmse": math.sqrt(float(((pred - yte).float() ** 2).mean())), "per_class": per_class}


def fit_and_score(x: torch.Tensor, y: torch.Tensor, test: torch.Tensor, cfg: dict) -> dict:
    """x: [N, V, D] features in V views. Returns accuracy, RMSE and per-class accuracy on `test`."""
    outputs = fit_head(x, y, ~test, cfg)(x[test])
    return score(predict(cfg["head"], outputs, cfg["decode"]), y[test])


def out_of_fold(x: torch.Tensor, y: torch.Tensor, cfg: dict, seed: int = 0) -> torch.Tensor:
    """[N, K] class probabilities of every photo from the head trained on the other 4 folds
    (`seed` picks the folds: 0 is every table's)."""
    result = torch.empty(len(y), K)
    for test in folds(y, seed=seed):
        result[test] = probabilities(cfg["head"], fit_head(x, y, ~test, cfg)(x[test]))
    return result


def run(features: dict, cfg: dict) -> dict:
    y = features["labels"]
    if cfg["pool"] == "avg":
        x = features["avg"].float()
    elif cfg["pool"] == "avgmax":
        x = torch.cat([features["avg"].float(), features["max"].float()], -1)
    elif cfg["pool"] == "stages":  # every stage's mean and max, the last map's 2x2 grid
        x = features["stages"].float()
    else:  # "early": stages only (no last-map grid)
        x = features["stages"][..., :2 * 768].float()
    scores = [fit_and_score(x, y, test, cfg) for test in folds(y)]
    acc = [s["accuracy"] for s in scores]
    rmse = [s["rmse"] for s in scores]
    per_class = [statistics.mean(s["per_class"][c] for s in scores) for c in range(K)]
    return {**cfg, "accuracy_mean": statistics.mean(acc), "accuracy_std": statistics.stdev(acc),
            "rmse_mean": statistics.mean(rmse), "rmse_std": statistics.stdev(rmse),
            "per_class_accuracy": per_class, "folds_accuracy": acc, "folds_rmse": rmse}


def show(r: dict) -> str:
    pc = " ".join(f"{a:.2f}" for a in r["per_class_accuracy"])
    return (f"{r['size']:>3}px {r['pool']:<7} {r['head']:<10} hid={r['hidden']:<3} bal={int(r['balanced'])} "
            f"aug={r['train_views']} tta={int(r['tta'])} dec={r['decode']:<6} l2={r.get('l2', 0):<6} lr={r['lr']:<5} "
            f"acc {r['accuracy_mean']:.3f}+-{r['accuracy_std']:.3f} rmse {r['rmse_mean']:.3f}+-{r['rmse_std']:.3f} "
            f"per-class [{pc}]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--features", type=Path, default=Path("/tmp/invmon-features"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 320])
    parser.add_argument("--grid", default="main", choices=("main", "quick", "l2", "final", "backbones"))
    parser.add_argument("--tag", default="", help="features_<size><tag>.pt")
    parser.add_argument("--concat", nargs="*", default=[], metavar="SIZE+TAG",
                        help="also concatenate these feature files' avg features (e.g. 320_lite2): "
                             "frozen features of several backbones or resolutions side by side")
    parser.add_argument("--skip", type=int, default=0, help="final grid: skip the first N configurations")
    parser.add_argument("--out", type=Path, default=Path("/tmp/invmon-features/cv.json"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = {"pool": "avg", "hidden": 0, "balanced": True, "train_views": 4, "tta": True,
            "decode": "argmax", "wd": 0.05, "lr": 0.003, "steps": 600}
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
        configs = []
        # Heads x decoding, with the default options.
        for head in ("classify", "ordinal", "regression"):
            for decode in (("argmax", "median") if head != "regression" else ("argmax",)):
                configs.append({**base, "head": head, "decode": decode})
        if args.grid == "l2":
            configs = []
            for pool in ("avg", "stages"):
                for l2 in (1e-3, 1e-2, 1e-1):
                    for head, decode in (("classify", "argmax"), ("ordinal", "median"), ("ordinal", "mean"),
                                         ("regression", "argmax")):
                        configs.append({**base, "pool": pool, "head": head, "decode": decode, "l2": l2,
                                        "steps": 400})
        if args.grid == "final":  # the real profile's setting and its neighbours
            one = {**base, "head": "ordinal", "decode": "median", "l2": 0.3, "train_views": 2, "tta": False,
                   "steps": 400}
            configs = [{**one, "l2": l2} for l2 in (0.03, 0.1, 0.3, 1.0)]
            configs += [{**one, "l2": 0.1, "decode": "mean"}, {**one, "l2": 0.1, "decode": "argmax"}]
            configs += [{**one, "decode": "mean"}, {**one, "head": "classify", "decode": "argmax"},
                        {**one, "head": "regression", "decode": "argmax"}, {**one, "balanced": False},
                        {**one, "train_views": 1}, {**one, "train_views": 4}, {**one, "train_views": 4, "tta": True}]
            configs = configs[args.skip:]
        if args.grid == "backbones":  # one backbone/resolution against another: the leading heads
            one = {**base, "head": "ordinal", "decode": "median", "l2": 0.3, "train_views": 2, "tta": False,
                   "steps": 400}
            configs = [{**one, "l2": l2} for l2 in (0.1, 0.3, 1.0)]
            configs += [{**one, "decode": "mean", "l2": l2} for l2 in (0.1, 0.3)]
            configs += [{**one, "tta": True}, {**one, "decode": "mean", "tta": True},
                        {**one, "head": "classify", "decode": "argmax"}, {**one, "head": "regression", "decode": "argmax"}]
        if args.grid == "main":
            for head in ("classify", "ordinal"):
                decode = "median" if head == "ordinal" else "argmax"
                one = {**base, "head": head, "decode": decode}
                configs += [{**one, "balanced": False}, {**one, "tta": False},
                            {**one, "train_views": 1, "tta": False},
                            {**one, "wd": 0.5}, {**one, "wd": 0.005},
                            {**one, "pool": "avgmax"}, {**one, "hidden": 256}]
        available = features["avg"].shape[1]
        configs = [{**c, "train_views": min(c["train_views"], available)} for c in configs]
        configs = [c for i, c in enumerate(configs) if c not in configs[:i]]
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
