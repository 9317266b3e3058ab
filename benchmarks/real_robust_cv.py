"""Does training the frozen recipe's head on augmented views make it robust to unclear photos?

    python benchmarks/real_robust_cv.py [--data ../shared/data/abid-sample] [--size 224]
                                        [--arch efficientnet_lite0] [--out /tmp/invmon-features]

The `real` profile trained its head on frozen features of each photo and its mirror image, and
Evaluate found it weak on blurred and noisy photos: the head never saw one. (It now trains on
the photo and one augmented view at strength 1, the winner here.) This extracts,
once per photo (cached in features_<size>_robust_<lite0|lite1|lite2>.pt):
    clean, mirror                  what the profile trained on before
    aug1, aug2, aug3               the mirror image through augment.build_train_transform at
                                   strength 1, 2 and 3 (seeded per photo), what it could train on
    blur, noise, low_light, jpeg   Evaluate's own corruptions (evaluate.corrupt), the test views
and cross-validates train.py's frozen-backbone head (ordinal, median decoding, class-balanced,
trained by benchmarks/real_cv.py with the trainer's own parts) on the same 5 folds, for each set
of training views, scoring the held-out photos clean and under each corruption.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import trainer  # noqa: F401,I001  (first: its OpenMP setting must precede torch, as in a training job)
import augment
import evaluate
import inference
import real_cv  # a sibling: the folds, and the frozen head trained fold by fold
import torch
from PIL import Image
from trainer.data import class_folder_images
from trainer.heads import scores
from trainer.model import load_pretrained

ROOT = Path(__file__).resolve().parent.parent
AUGMENTED = ("aug1", "aug2", "aug3")
VIEWS = ("clean", "mirror", *AUGMENTED, *evaluate.CORRUPTIONS)
TRAIN_SETS = {
    "clean + mirror (before)": ("clean", "mirror"),
    "clean + aug1": ("clean", "aug1"),
    "clean + aug2": ("clean", "aug2"),
    "clean + aug3": ("clean", "aug3"),
    "clean + mirror + aug2": ("clean", "mirror", "aug2"),
    "clean + mirror + aug2 + aug3": ("clean", "mirror", "aug2", "aug3"),
}


def extract(args) -> dict:
    target = args.out / f"features_{args.size}_robust{args.arch.removeprefix('efficientnet')}.pt"
    if target.exists():
        return torch.load(target, weights_only=False)
    samples = class_folder_images(args.data)
    mean, std = inference.normalization(args.arch)
    config = {"image_size": args.size, "mean": mean, "std": std}
    model = inference.build_model(args.arch, 5, image_size=args.size)
    load_pretrained(model, args.arch, "auto", print)
    model._fc = torch.nn.Identity()
    model.eval().to(memory_format=torch.channels_last)
    augmenters = [augment.build_train_transform(s, args.size, lambda x: x) for s in (1, 2, 3)]
    started, rows = time.perf_counter(), []
    for number, (path, _) in enumerate(samples):
        with Image.open(path) as image:
            image.load()
        pixels = inference.to_pixels(image, config)
        torch.manual_seed(number)  # the same augmented views every run
        views = [pixels, pixels.flip(-1)]
        views += [(a(pixels.flip(-1)) * 255).round().clamp(0, 255).to(torch.uint8) for a in augmenters]
        for kind in evaluate.CORRUPTIONS:
            body, ctype = evaluate.corrupt(image, kind, 0, path.name)
            views.append(inference.to_pixels(inference.input_fn(body, ctype), config))
        batch = inference.normalize(torch.stack(views), config).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            rows.append(model(batch).half())
        if number % 200 == 0:
            print(f"  {number}/{len(samples)} photos, {(number + 1) / (time.perf_counter() - started):.1f} photos/s",
                  flush=True)
    features = {"avg": torch.stack(rows), "views": VIEWS, "labels": torch.tensor([i for _, i in samples]),
                "paths": [str(p) for p, _ in samples], "seconds": time.perf_counter() - started}
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(features, target)
    print(f"{len(samples)} photos x {len(VIEWS)} views in {features['seconds']:.0f}s -> {target}", flush=True)
    return features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "abid-sample")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--arch", default="efficientnet_lite0", choices=sorted(inference.EFFICIENTNETS))
    parser.add_argument("--out", type=Path, default=Path("/tmp/invmon-features"))
    parser.add_argument("--weight-decay", default="auto", help="the head's (train.py --weight_decay)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    features = extract(args)
    x, y = features["avg"].float(), features["labels"]
    cfg = {**real_cv.SHARED, "head": "ordinal", "decode": "median", "tta": False, "weight_decay": args.weight_decay}
    tested = ("clean", *evaluate.CORRUPTIONS)
    print(f"{'trained on':<30} " + " ".join(f"{v:>9}" for v in tested)
          + "   clean RMSE, weakest count   (accuracy: mean over 5 folds)")
    for name, views in TRAIN_SETS.items():
        train_x = x[:, [VIEWS.index(v) for v in views]]
        scored = {view: [] for view in tested}
        for test in real_cv.folds(y):  # one head per fold, scored on each view of the held-out photos
            one = {**cfg, "train_views": len(views)}
            head, _ = real_cv.fit_head(train_x, y, ~test, test, one)
            for view in tested:
                held_out = real_cv.probabilities(head, x[test][:, [VIEWS.index(view)]], one)
                scored[view].append(scores(inference.decode_counts(held_out, cfg["decode"]), y[test]))
        accuracy = {v: statistics.mean(s["accuracy"] for s in scored[v]) for v in tested}
        rmse = statistics.mean(s["rmse"] for s in scored["clean"])
        weakest = min(statistics.mean(s["per_class"][c] for s in scored["clean"]) for c in range(5))
        print(f"{name:<30} " + " ".join(f"{accuracy[v]:>9.3f}" for v in tested)
              + f"   {rmse:.3f}, {weakest:.2f}", flush=True)


if __name__ == "__main__":
    main()
