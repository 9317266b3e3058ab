"""Checkpoints: each epoch's state, written atomically, so that a restarted job (a spot
interruption, a killed instance) resumes where it stopped, and only a job of the same
configuration resumes it."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from trainer.args import DEFAULT_CHECKPOINT_DIR, SWITCH_OFF
from trainer.report import TrainError

CHECKPOINT_NAME = "checkpoint.pth"


def save_atomic(obj, path: Path) -> None:
    """torch.save to a temporary file, then rename: a job killed mid-write leaves the old file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoint_dir(args, log) -> Path | None:
    """Where this job checkpoints (--checkpoint_dir), checked writable; None: no checkpoints."""
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
            "weight_decay", "lr_schedule", "warmup_epochs", "label_smoothing", "mixup", "augment", "pretrained",
            "head", "class_weights", "freeze_backbone", "frozen_blocks", "feature_views", "keep_epoch",
            "tails")
    return {**{k: getattr(args, k) for k in keys}, "refit": getattr(args, "refit", False), "train_images": n_train,
            "job": os.environ.get("TRAINING_JOB_NAME", "")}


def load_checkpoint(path: Path | None, args, n_train: int, log) -> dict | None:
    """The checkpoint at `path` when it is this job's (identity); None to start from epoch 1."""
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

