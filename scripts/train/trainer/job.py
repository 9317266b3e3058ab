"""One training job, from its parsed arguments to the model directory: the data, the network and
its starting weights, what trains (the whole network, a head on frozen features, or tails on a
frozen front), and the artifact rank 0 writes."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from trainer import distributed
from trainer.artifact import finish, model_config
from trainer.checkpoint import CHECKPOINT_NAME, checkpoint_dir, load_checkpoint
from trainer.data import load_data, make_loader
from trainer.frozen import frozen_setup, partial_setup
from trainer.loop import Session, seed_everything, train_epochs
from trainer.model import build, load_pretrained
from trainer.recall_floor import floored
from trainer.refit import first_tail_images, refit_sessions, validation_parts
from trainer.tails import train_tails


def run(args) -> None:
    place = distributed.setup()
    log, device = place.log, place.device
    seed_everything(args.seed + place.rank)
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # All cores, shared among the processes on this host (torchrun sets OMP_NUM_THREADS itself).
        torch.set_num_threads(max(1, distributed.usable_cpus() // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    config = model_config(args)
    train_set, val_set = load_data(args, config, log)
    train_loader = make_loader(train_set, args, place, train=True)
    val_loader = make_loader(val_set, args, place, train=False)

    model = build(args)
    ckpt_dir = checkpoint_dir(args, log)  # every rank resumes from it; only rank 0 writes it
    ckpt_path = ckpt_dir / CHECKPOINT_NAME if ckpt_dir else None
    # --refit: the validation photos' parts, dealt before the first tail's checkpoint (keyed by the
    # photos it trains on) is looked for.
    parts = validation_parts(val_set.samples, args.tails, args.seed) if args.refit else None
    n_first = first_tail_images(len(train_set), parts) if parts else len(train_set)
    checkpoint = load_checkpoint(ckpt_path, args, n_first, log)
    if checkpoint:
        pretrained = checkpoint["pretrained"]
    else:
        # Every rank loads them (so a bad --pretrained fails everywhere, not only on rank 0).
        pretrained = load_pretrained(model, args.arch, args.pretrained, log)

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
        if args.refit:
            fit, sessions, refit = refit_sessions(model, train_set, val_set, parts, args, place, config, pretrained,
                                                  ckpt_path)
        else:
            setup = frozen_setup if args.freeze_backbone else partial_setup
            fit, train_loader, val_loader = setup(model, train_set, val_set, args, place, config)
    if not args.refit:
        session = Session(args, place, train_loader, val_loader, train_set.targets, pretrained, ckpt_path)
        sessions, refit = [session] * args.tails, None
    if args.tails == 1:
        best, history = train_epochs(sessions[0], model, fit, checkpoint)
    else:
        best, history = train_tails(sessions, model, fit, checkpoint, refit)
    if args.recall_floor:
        best = floored(best, args.recall_floor, log)
    if place.rank == 0:
        finish(args, best, history, config, pretrained, len(train_set), log)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
