"""The frozen part's output (--freeze_backbone: the backbone's pooled features; --frozen_blocks:
the stem and first blocks' feature maps), computed once per photo and view and cached on disk, so
that the trials and the final job on the same photos compute it once."""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import tempfile
import time
from pathlib import Path

import inference
import torch
from augment import build_train_transform
from torch.utils.data import DataLoader

from trainer.args import feature_views
from trainer.checkpoint import save_atomic
from trainer.data import BinImages
from trainer.distributed import Place
from trainer.model import head_name
from trainer.report import PROGRESS_SECONDS


def augmented_view(augmenter, pixels: torch.Tensor, seed: int) -> torch.Tensor:
    """One draw of the training augmentation, seeded (the cached features are reproducible) without
    touching the training loop's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return augmenter(pixels)


@torch.inference_mode()
def backbone_features(model, data: BinImages, views: int, args, place: Place, augmenter=None) -> torch.Tensor:
    """[N, views, D] pooled features of the frozen backbone (eval mode), or with --frozen_blocks the
    frozen part's feature maps, [N, views, C, H, W] in bfloat16: each photo as is, then its flips,
    or with `augmenter` (the training photos) `views - 1` draws of the training augmentation.

    A head trained on clean features alone never sees a blurred or noisy photo. On the real sample
    (5-fold CV, benchmarks/real_robust_cv.py) training on the photo and one augmented view instead
    of its mirror image kept clean accuracy (0.329 against 0.322) and lifted it under Evaluate's
    blur from 0.18 to 0.27 and under its noise from 0.25 to 0.29, at the same cost.
    """
    name = head_name(args.arch)
    head = getattr(model, name)
    first_block = args.frozen_blocks
    if first_block:
        encode, dtype = functools.partial(inference.front, model, first_block), torch.bfloat16
    else:
        setattr(model, name, torch.nn.Identity())
        encode, dtype = model, torch.float32
    model.eval()
    normalize, data.transform = data.transform, lambda pixels: pixels  # views are made from the pixels
    # Small batches in channels_last run fastest on a few CPU cores (Lite0 at 224 px on 2 cores:
    # batch 8 channels_last 14 img/s, batch 32 contiguous 7 img/s).
    # Its own generator: an iterator draws a seed, and the training loop's random state must not
    # depend on whether the features came from the cache.
    loader = DataLoader(data, batch_size=64 if place.device.type == "cuda" else 8, shuffle=False, num_workers=0,
                        generator=torch.Generator())
    model.to(memory_format=torch.channels_last)
    out, started, done = [], time.perf_counter(), 0
    last_report = started
    try:
        for pixels, _ in loader:
            images = normalize(pixels)
            if augmenter is None:
                batch = [images, images.flip(-1), images.flip(-2), images.flip(-1).flip(-2)][:views]
            else:  # seeded per photo and view: the same features whatever the batch size
                batch = [images] + [torch.stack([augmented_view(augmenter, px, hash((args.seed, done + i, v)))
                                                 for i, px in enumerate(pixels)]) for v in range(1, views)]
            batch = [view.to(place.device).contiguous(memory_format=torch.channels_last) for view in batch]
            out.append(torch.stack([encode(view).to(dtype).cpu() for view in batch], 1))
            done += len(images)
            now = time.perf_counter()
            if now - last_report > PROGRESS_SECONDS and done < len(data):
                last_report = now
                place.log(f"progress features {done}/{len(data)} photos ({done * views / (now - started):.1f} views/s)")
    finally:
        setattr(model, name, head)
        data.transform = normalize
    return torch.cat(out)


def feature_cache_path(data: BinImages, args) -> Path:
    """Features depend on the photos, architecture, size and weights only: trials on the same
    split (the local tuner runs them one after another) compute them once."""
    what = [args.arch, args.image_size, args.pretrained, torch.__version__]
    if args.frozen_blocks:  # the feature maps after that block, not pooled features
        what.append(f"front{args.frozen_blocks}")
    digest = hashlib.sha256(json.dumps(what).encode())
    for path, index in data.samples:
        stat = path.stat()
        digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{index}\n".encode())
    folder = Path(os.environ.get("INVMON_FEATURE_CACHE", Path(tempfile.gettempdir()) / "invmon-feature-cache"))
    return folder / f"{digest.hexdigest()[:24]}.pt"


def cached_features(model, data: BinImages, views: int, args, place: Place, augmenter=None) -> torch.Tensor:
    """backbone_features, from the cache when an earlier job on the same photos computed them."""
    path = feature_cache_path(data, args)
    kind = "flips"
    if augmenter is not None and views > 1:
        # The augmented views depend on the strength, the seed and augment.py itself.
        recipe = hashlib.sha256(Path(inspect.getfile(build_train_transform)).read_bytes())
        recipe.update(f"{args.augment}|{args.seed}".encode())
        kind = f"augmented-{recipe.hexdigest()[:12]}"
    else:
        augmenter = None
    path = path.with_name(f"{path.stem}-{views}-{kind}.pt")
    described = f"{len(data)} photos x {views} views ({kind.split('-')[0]})"
    if path.is_file():
        try:
            features = torch.load(path, map_location="cpu", weights_only=True)
            if features.shape[:2] == (len(data), views):
                place.log(f"features: {described} from the cache {path}")
                return features
        except Exception:  # a damaged cache file is recomputed
            pass
    started = time.perf_counter()
    features = backbone_features(model, data, views, args, place, augmenter)
    place.log(f"features: {described} in {time.perf_counter() - started:.1f}s")
    if place.rank == 0:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_atomic(features, path)
        except OSError:
            pass
    return features


def frozen_outputs(model, train_set: BinImages, val_set: BinImages, args, place: Place, config: dict):
    """The frozen part's cached output: `views` views of each training photo (the photo, then
    augmented ones), and the validation photo as is, or its 4 flips with --tta flips."""
    normalize = functools.partial(inference.normalize, config=config)
    train_set.transform = normalize  # the frozen part runs once, augmented views included
    views = feature_views(args)
    augmenter = view_augmenter(args, normalize)
    train_outputs = cached_features(model, train_set, views, args, place, augmenter)
    val_outputs = cached_features(model, val_set, 4 if inference.tta_has(args.tta, "flips") else 1, args, place)
    return train_outputs, val_outputs, views


def view_augmenter(args, normalize):
    """What makes the training photos' views after the first: the training augmentation at
    --augment strength, or None at strength 0 (the views are then the photo's flips)."""
    return build_train_transform(args.augment, args.image_size, normalize) if args.augment > 0 else None
