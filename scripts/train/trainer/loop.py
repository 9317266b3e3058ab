"""The epochs of one model: resumed from its checkpoint, a metric line each (the tuner's regexes
read them), a checkpoint each, and the kept epoch (--keep_epoch) with its validation outputs."""
from __future__ import annotations

import random
import time
from pathlib import Path

import debugger  # smdebug hook when smdebug imports (debugger.py); else records nothing
import torch
from torch.utils.data import DistributedSampler

from trainer.checkpoint import identity, save_atomic
from trainer.distributed import Place
from trainer.epoch import amp_dtype, evaluate, train_one_epoch
from trainer.frozen import BN_VIEWS, Tail, recompute_bn_statistics
from trainer.heads import balanced_weights
from trainer.model import head_name
from trainer.optim import make_optimizer, make_scheduler


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy
        numpy.random.seed(seed)
    except ImportError:
        pass


class Session:
    """What every tail's training shares: the data, this process's place, the checkpoint file.
    `targets` are the training photos' classes (the balanced loss weights); `pretrained` is where
    the starting weights came from (None: from scratch), kept in the checkpoint."""

    def __init__(self, args, place: Place, train_loader, val_loader, targets: list[int],
                 pretrained: str | None = None, ckpt_path: Path | None = None):
        self.args, self.place, self.pretrained, self.ckpt_path = args, place, pretrained, ckpt_path
        self.class_targets, self.n_train = targets, len(targets)
        self.train_loader, self.val_loader = train_loader, val_loader
        # --max_batches caps both passes (smoke tests)
        self.train_steps = min(len(train_loader), args.max_batches or len(train_loader))
        self.val_steps = min(len(val_loader), args.max_batches or len(val_loader))
        self.dtype = amp_dtype(place.device, args.amp)

    @property
    def device(self) -> torch.device:
        return self.place.device

    def member_checkpoint(self, member: int) -> Path | None:
        """Each tail (--tails) checkpoints on its own; the first one where a single model does."""
        if not self.ckpt_path or not member:
            return self.ckpt_path
        return self.ckpt_path.with_name(f"{self.ckpt_path.stem}-tail{member + 1}{self.ckpt_path.suffix}")


def train_epochs(session: Session, model, fit, checkpoint: dict | None, member: int = 0) -> tuple[dict, list]:
    """Train `fit` (the whole network, a head on frozen features, or a Tail of `model`) for
    --epochs, from `checkpoint` when it holds this run; returns (kept epoch, history)."""
    args, place, dtype = session.args, session.place, session.dtype
    device = place.device
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
        place.log(f"resuming from checkpoint {session.member_checkpoint(member)}: epoch {checkpoint['epoch']} of "
                  f"{args.epochs} done" + (f" (tail {member + 1} of {args.tails})" if args.tails > 1 else "")
                  + f", continuing at epoch {start_epoch}")
    bare = model  # the whole network: its state is what is checkpointed and saved
    unwrapped = fit
    if place.world > 1:
        fit = torch.nn.parallel.DistributedDataParallel(fit)  # broadcasts rank 0's weights
    if member == 0:
        # The hook goes on the module the loop calls (the head alone on frozen features): smdebug
        # prepares its collections in the forward pass of the module it was registered on.
        debugger.attach(unwrapped, place.rank)

    place.log(f"training {args.arch} at {args.image_size}px on {device} (x{place.world}, {torch.get_num_threads()} "
              f"threads, {train_loader.num_workers} workers): {args.epochs} epochs x {train_steps} batches of "
              f"{args.batch_size}, {args.optimizer} lr {args.lr} {args.lr_schedule}"
              + ("" if args.freeze_backbone
                 else f" (backbone x{args.backbone_lr}, from epoch {args.head_warmup_epochs + 1})")
              + f", augment {args.augment}, decode {args.decode}, tta {args.tta}, amp {dtype or 'off'}")
    for epoch in range(start_epoch, args.epochs + 1):
        started = time.perf_counter()
        if isinstance(train_loader.sampler, DistributedSampler):
            train_loader.sampler.set_epoch(epoch)
        train = train_one_epoch(fit, train_loader, train_steps, optimizer, scheduler, scaler, place, dtype,
                                args, epoch, class_weight)
        if isinstance(unwrapped, Tail):  # a pass over a few hundred cached views: about a second
            recompute_bn_statistics(unwrapped, train_loader, min(train_steps, -(-BN_VIEWS // args.batch_size)),
                                    device)
        # On cached outputs the flips are views in the data already.
        val = evaluate(fit, session.val_loader, session.val_steps, place, dtype, args.head, args.decode,
                       "none" if args.freeze_backbone or args.frozen_blocks else args.tta)
        outputs = val.pop("outputs")
        seconds = time.perf_counter() - started
        place.log(f"epoch={epoch}/{args.epochs} train:loss={train['loss']:.4f} "
                  f"train:accuracy={train['accuracy']:.4f} validation:loss={val['loss']:.4f} "
                  f"validation:accuracy={val['accuracy']:.4f} validation:rmse={val['rmse']:.4f} "
                  f"images_per_sec={train['images_per_sec']:.1f} seconds={seconds:.1f}")
        history.append({"epoch": epoch, "train": train, "validation": val, "seconds": round(seconds, 2),
                        "lr": optimizer.param_groups[0]["lr"]})
        if args.keep_epoch == "last" or val["accuracy"] > best["accuracy"]:
            state = {k: v.detach().cpu().clone().contiguous() for k, v in bare.state_dict().items()}
            if args.freeze_backbone:
                state = unwrapped.folded(state, head_name(args.arch) + ".")
            best = {"epoch": epoch, "accuracy": val["accuracy"], "metrics": val, "state_dict": state,
                    "outputs": place.gathered(outputs)}
        if session.ckpt_path and place.rank == 0:
            save_atomic({"epoch": epoch, "identity": identity(args, session.n_train),
                         "pretrained": session.pretrained,
                         "model": bare.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                         "rng": {"torch": torch.get_rng_state(),
                                 "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None},
                         "history": history, "best": best}, session.member_checkpoint(member))
    if start_epoch > args.epochs:
        place.log(f"checkpoint already holds all {args.epochs} epochs"
                  + (f" of tail {member + 1}" if args.tails > 1 else ""))
    return best, history

