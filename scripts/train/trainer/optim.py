"""The optimizer (SGD with momentum or AdamW), its weight decay, and the per-step lr schedule."""
from __future__ import annotations

import functools
import math

import torch

from trainer.model import head_name

# = 2 x the L2 penalty 0.1: in 5-fold CV (docs/model.md) the most accurate penalty whose weakest
# count stays clear of 0.15 (0.3 scored 0.012 higher, within the spread, with count 5 at 0.17).
FROZEN_WEIGHT_DECAY = 0.2
# AdamW's decay is decoupled (applied at the lr): 0.05 is what the fine-tuning table of
# docs/model.md (benchmarks/real_finetune_cv.py) trained with; SGD keeps the reference 1e-4.
ADAMW_WEIGHT_DECAY = 0.05


def weight_decay(args) -> float:
    if args.weight_decay >= 0:
        return args.weight_decay
    if args.freeze_backbone:
        return FROZEN_WEIGHT_DECAY
    return ADAMW_WEIGHT_DECAY if args.optimizer == "adamw" else 1e-4


def make_optimizer(model: torch.nn.Module, args) -> torch.optim.Optimizer:
    decay = weight_decay(args)
    params = [p for p in model.parameters() if p.requires_grad]
    if args.freeze_backbone:
        # A head alone: decay its weight matrices, not its biases or ordinal thresholds.
        params = [{"params": [p for p in params if p.dim() > 1], "weight_decay": decay},
                  {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}]
    else:
        # The head first (its group is the one whose lr is logged), then the backbone at its own lr.
        head = {id(p) for p in getattr(model, head_name(args.arch)).parameters()}
        params = [{"params": [p for p in params if id(p) in head]},
                  {"params": [p for p in params if id(p) not in head],
                   "lr": args.lr * args.backbone_lr}]
    if args.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=args.lr, weight_decay=decay)
    return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=decay)


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, steps_per_epoch: int, args):
    """The per-step lr schedule of every group; the backbone's group waits --head_warmup_epochs."""
    schedule = functools.partial(lr_factor, total=total_steps, steps_per_epoch=steps_per_epoch, args=args)
    if args.freeze_backbone:  # every group is the head's
        return torch.optim.lr_scheduler.LambdaLR(optimizer, [schedule] * len(optimizer.param_groups))
    warmup = args.head_warmup_epochs * steps_per_epoch
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

