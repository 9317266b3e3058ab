"""The train and validation channels: `<count>/<id>.jpg` class folders (as scripts/preprocess
writes them), their images as datasets, and the loaders every rank reads its share through."""
from __future__ import annotations

import functools
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import inference
import torch
from augment import build_train_transform
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from trainer.distributed import Place, usable_cpus
from trainer.report import TrainError

LABELS = (1, 2, 3, 4, 5)  # the counts; class index i is count LABELS[i]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def class_folder_images(root: Path) -> list[tuple[Path, int]]:
    """(path, class index) for every image in `root`'s `<count>/` folders, sorted."""
    samples = []
    for index, label in enumerate(LABELS):
        folder = root / str(label)
        if folder.is_dir():
            samples += [(p, index) for p in sorted(folder.iterdir())
                        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    return samples


def list_images(channel: str) -> list[tuple[Path, int]]:
    """class_folder_images of a SageMaker channel (SM_CHANNEL_<NAME>), which must hold some."""
    env = f"SM_CHANNEL_{channel.upper()}"
    root = os.environ.get(env)
    if not root:
        raise TrainError(f"the {channel} channel is missing: {env} is not set")
    root_path = Path(root)
    if not root_path.is_dir():
        raise TrainError(f"the {channel} channel {root} ({env}) does not exist or is not a directory")
    samples = class_folder_images(root_path)
    if not samples:
        raise TrainError(f"the {channel} channel {root} holds no images: expected "
                         f"<count>/<id>.jpg class folders for counts {LABELS[0]}-{LABELS[-1]}")
    return samples


def stratified_fraction(samples: list, fraction: float, seed: int) -> list:
    """A seeded fraction of each class (at least one image per class present)."""
    rng = random.Random(seed)
    kept = []
    for index in range(len(LABELS)):
        members = [s for s in samples if s[1] == index]
        rng.shuffle(members)
        if members:
            kept += members[:max(1, round(len(members) * fraction))]
    return sorted(kept)


def class_counts(samples: list) -> str:
    counts = [sum(1 for _, i in samples if i == index) for index in range(len(LABELS))]
    return " ".join(f"{label}:{n}" for label, n in zip(LABELS, counts))


class BinImages(Dataset):
    """Class-folder images as `inference.to_pixels` makes them (uint8 CHW, whole photo resized).

    With `cache` the photos are decoded once into memory, so an epoch only pays for augmentation;
    otherwise each item is read and decoded from disk (in DataLoader workers).
    """

    def __init__(self, samples: list, config: dict, transform, cache: bool):
        self.config = config
        self.transform = transform
        self.pixels = None
        self.rejected: list[str] = []
        if cache:
            with ThreadPoolExecutor(usable_cpus()) as pool:  # PIL decodes outside the GIL
                decoded = list(pool.map(self._decode, (path for path, _ in samples)))
            self.rejected = [str(p) for (p, _), px in zip(samples, decoded) if px is None]
            kept = [(s, px) for s, px in zip(samples, decoded) if px is not None]
            samples = [s for s, _ in kept]
            self.pixels = torch.stack([px for _, px in kept]) if kept else None
        self.samples = samples
        self.targets = [index for _, index in samples]

    def _decode(self, path: Path):
        try:
            with Image.open(path) as image:
                return inference.to_pixels(image, self.config)
        except (OSError, ValueError, SyntaxError):  # preprocess validated: this is rare
            return None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        if self.pixels is not None:
            pixels = self.pixels[i]
        else:
            with Image.open(self.samples[i][0]) as image:
                pixels = inference.to_pixels(image, self.config)
        return self.transform(pixels), self.targets[i]


def load_data(args, config: dict, log) -> tuple[BinImages, BinImages]:
    train_samples = list_images("train")
    val_samples = list_images("validation")
    if args.data_fraction < 1:
        total = len(train_samples)
        train_samples = stratified_fraction(train_samples, args.data_fraction, args.seed)
        log(f"trial mode: data_fraction={args.data_fraction} keeps {len(train_samples)} of {total} "
            f"training images, stratified by count")
    if len(train_samples) < 2:
        raise TrainError(f"the training set has {len(train_samples)} image(s); at least 2 are needed")

    # Decode into memory when the splits fit the budget (training first: it is read every epoch).
    image_bytes = 3 * args.image_size ** 2
    budget = args.cache_mb * 2 ** 20
    cache_train = len(train_samples) * image_bytes <= budget
    cache_val = (cache_train * len(train_samples) + len(val_samples)) * image_bytes <= budget
    normalize = functools.partial(inference.normalize, config=config)
    started = time.perf_counter()
    augment = build_train_transform(args.augment, args.image_size, normalize)
    train_set = BinImages(train_samples, config, augment, cache_train)
    val_set = BinImages(val_samples, config, normalize, cache_val)
    for name, data in (("train", train_set), ("validation", val_set)):
        if data.rejected:
            log(f"warning: {len(data.rejected)} undecodable {name} image(s) skipped, e.g. {data.rejected[0]}")
        if not len(data):
            raise TrainError(f"the {name} channel has no decodable images")
    log(f"data: train {len(train_set)} ({class_counts(train_set.samples)}), validation {len(val_set)} "
        f"({class_counts(val_set.samples)}); in memory: train={cache_train} validation={cache_val} "
        f"({time.perf_counter() - started:.1f}s)")
    return train_set, val_set


def choose_workers(requested: int, cached: bool, device: torch.device) -> int:
    if requested >= 0:
        return requested
    cpus = usable_cpus()
    if device.type == "cuda":
        return min(8, cpus)  # a GPU step is fast: keep the CPU side fed
    if cached:
        # Measured on 2 cores (benchmarks/train_throughput.py, ResNet-18 at 96 px, batch 64),
        # as a share of the bare training step: 0 workers 0.90, 1 worker 0.94, 2 workers 0.90.
        # One process augmenting the next batch while the step runs beats both augmenting
        # inline and crowding the two cores.
        return 1
    return max(1, min(4, cpus // 2))  # decoding from disk too


def make_loader(data: BinImages, args, place: Place, train: bool) -> DataLoader:
    """The training or validation loader of a split of photos, with worker processes to suit."""
    cached = data.pixels is not None
    # Cached validation images only need normalising: no worker process is worth starting.
    workers = 0 if cached and not train and args.workers < 0 else choose_workers(args.workers, cached, place.device)
    options = {"num_workers": workers, "pin_memory": place.device.type == "cuda", "persistent_workers": workers > 0}
    if not train:
        return sharded_loader(data, args.batch_size, place, **options)
    return shuffled_loader(data, args.batch_size, args.seed, place, **options)


def shuffled_loader(data: Dataset, batch_size: int, seed: int, place: Place, **options) -> DataLoader:
    """Training: shuffled per epoch (sampler.set_epoch), sharded across ranks."""
    sampler = DistributedSampler(data, num_replicas=place.world, rank=place.rank, shuffle=True, seed=seed)
    # BatchNorm cannot train on a batch of one: drop a last batch that would be a single image.
    drop_last = len(sampler) % batch_size == 1 and len(sampler) > 1
    return DataLoader(data, batch_size=batch_size, sampler=sampler, drop_last=drop_last, **options)


def sharded_loader(data: Dataset, batch_size: int, place: Place, **options) -> DataLoader:
    """Validation: each rank scores its own slice without padding, so every image counts exactly once."""
    shard = Subset(data, range(place.rank, len(data), place.world))
    return DataLoader(shard, batch_size=batch_size, shuffle=False, **options)
