"""Training throughput of scripts/train/train.py next to the bare model step on the same batches.

    python benchmarks/train_throughput.py [--arch resnet18] [--image-size 96] [--batch-size 64]
                                          [--batches 10] [--rounds 3] [--data DIR]

Three numbers, in images per second:
  data pipeline   the train script's loader alone (in-memory pixels or disk decode, augmentation,
                  normalisation, collation), no model;
  train script    that loader feeding the script's own training step (trainer.epoch.train_one_epoch);
  raw model       the same training step on the same batches, pre-loaded as tensors.
The ratio train script / raw model shows what data loading costs: 1.00 means nothing.
Pipeline and raw passes alternate, and the median of the rounds is reported, so that a machine
shared with other work slows both alike.

--data is a folder of `<count>/<id>.jpg` class folders (a Preprocess output split); without it a
synthetic set is generated in a temporary folder (pipeline.data.synth bin photos, resized the way
Preprocess resizes them).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# The trainer first: it sets up the OpenMP environment before torch is loaded, as in a real run.
import trainer  # noqa: F401,I001  (scripts/train/trainer: the code under measurement)
import inference
import torch
from augment import build_train_transform
from PIL import Image, ImageDraw
from trainer.args import parse_args
from trainer.artifact import model_config
from trainer.data import LABELS, BinImages, list_images, make_loader
from trainer.distributed import Place, usable_cpus
from trainer.epoch import amp_dtype, train_one_epoch
from trainer.optim import make_optimizer
from trainer.report import TrainError


def synthetic_class_folders(dest: Path, images: int, short_side: int) -> Path:
    """`images` photos in `<count>/<id>.jpg` folders, short side resized like Preprocess does."""
    per_class = -(-images // 5)
    try:
        from pipeline.data.synth import write_dataset
    except ImportError:
        write_dataset = None
    out = dest / "train"
    if write_dataset is not None:
        abid = dest / "abid"
        write_dataset(abid, per_class=per_class, seed=0)
        for meta in sorted((abid / "metadata").glob("*.json")):
            count = json.loads(meta.read_text())["EXPECTED_QUANTITY"]
            image = Image.open(abid / "bin-images" / f"{meta.stem}.jpg").convert("RGB")
            scale = short_side / min(image.size)
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
            (out / str(count)).mkdir(parents=True, exist_ok=True)
            image.save(out / str(count) / f"{meta.stem}.jpg", quality=90)
        return out
    # pipeline.data.synth not available: coloured discs on a gray floor, count = number of discs.
    gen = torch.Generator().manual_seed(0)
    for count in range(1, 6):
        (out / str(count)).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = Image.new("RGB", (short_side * 5 // 4, short_side), (150, 140, 120))
            draw = ImageDraw.Draw(image)
            for _ in range(count):
                x, y = (torch.rand(2, generator=gen) * torch.tensor(image.size)).tolist()
                r = short_side / 10
                color = tuple(torch.randint(0, 256, (3,), generator=gen).tolist())
                draw.ellipse([x - r, y - r, x + r, y + r], fill=color, outline=(0, 0, 0))
            image.save(out / str(count) / f"{count}-{i:04d}.jpg", quality=90)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=10, help="timed batches per pass")
    p.add_argument("--rounds", type=int, default=3, help="alternating pipeline/raw passes; median reported")
    p.add_argument("--workers", default="auto", help="DataLoader workers (train.py's --workers)")
    p.add_argument("--augment", default="1.0", help="augmentation strength (train.py's --augment)")
    p.add_argument("--cache-mb", default="2048", help="train.py's --cache_mb; 0 = decode from disk")
    p.add_argument("--data", type=Path, help="class-folder split; default: generate a synthetic one")
    opts = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="invmon-bench-") as tmp:
        if opts.data is None:
            started = time.perf_counter()
            opts.data = synthetic_class_folders(Path(tmp), opts.batch_size * opts.batches,
                                                short_side=round(opts.image_size * 7 / 6))
            print(f"generated a synthetic set in {opts.data} ({time.perf_counter() - started:.1f} s)")
        os.environ["SM_CHANNEL_TRAIN"] = str(opts.data)
        try:
            return measure(opts)
        except TrainError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2


def measure(opts) -> int:
    args = parse_args(["--arch", opts.arch, "--image_size", str(opts.image_size),
                             "--batch_size", str(opts.batch_size), "--workers", opts.workers,
                             "--augment", opts.augment, "--cache_mb", opts.cache_mb,
                             "--epochs", "1", "--pretrained", "none", "--checkpoint_dir", "none"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    place = Place(device=device)
    if device.type == "cpu":
        torch.set_num_threads(usable_cpus())  # as train.py does
    config = model_config(args)
    samples = list_images("train")
    cache = len(samples) * 3 * args.image_size ** 2 <= args.cache_mb * 2 ** 20
    normalize = lambda pixels: inference.normalize(pixels, config)  # noqa: E731
    started = time.perf_counter()
    augment = build_train_transform(args.augment, args.image_size, normalize)
    data = BinImages(samples, config, augment, cache)
    load_seconds = time.perf_counter() - started
    loader = make_loader(data, args, place, train=True)
    steps = min(opts.batches, len(loader))
    if steps < 1:
        print(f"error: {len(data)} images make no batch of {args.batch_size}", file=sys.stderr)
        return 2

    torch.manual_seed(0)
    model = inference.build_model(args.arch, len(LABELS)).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, args)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    dtype = amp_dtype(device, args.amp)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)

    def step_pass(batches) -> float:
        return train_one_epoch(model, batches, steps, optimizer, scheduler, scaler, place, dtype,
                               args, 1)["images_per_sec"]

    def data_pass() -> float:
        started, seen = time.perf_counter(), 0
        for _, (images, _targets) in zip(range(steps), loader):
            seen += len(images)
        return seen / (time.perf_counter() - started)

    # The raw pass trains on exactly the batches the pipeline produces, held in memory.
    preloaded = [batch for _, batch in zip(range(steps), loader)]
    step_pass(preloaded[:2])  # warm-up: allocator, kernels, worker start-up
    pipeline, raw, loading = [], [], []
    for _ in range(opts.rounds):
        loading.append(data_pass())
        pipeline.append(step_pass(loader))
        raw.append(step_pass(preloaded))
    p, r, d = statistics.median(pipeline), statistics.median(raw), statistics.median(loading)

    where = (f"in memory (decoded {len(data)} images in {load_seconds:.1f} s)" if cache
             else "decoded from disk")
    threads = (f"{torch.get_num_threads()} threads" if device.type == "cpu"
               else torch.cuda.get_device_name(device))
    print(f"train throughput: {args.arch} @ {args.image_size} px, batch {args.batch_size}, {steps} batches x "
          f"{opts.rounds} rounds, {device.type} ({threads}), {loader.num_workers} DataLoader workers, "
          f"augment {args.augment}, data {where}")
    print(f"  data pipeline alone (no model)             {d:9.1f} img/s")
    print(f"  train script (data pipeline + train step)  {p:9.1f} img/s   rounds: "
          + " ".join(f"{x:.1f}" for x in pipeline))
    print(f"  raw model fwd/bwd on pre-loaded batches    {r:9.1f} img/s   rounds: "
          + " ".join(f"{x:.1f}" for x in raw))
    print(f"  ratio train script / raw                   {p / r:9.2f}"
          "         (1.00 = data loading costs nothing)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
