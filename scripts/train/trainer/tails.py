"""--tails: several tails trained on one cached front (each from the pretrained weights, with its
own seed), served as one model (inference.SharedFront) that runs the front once and averages the
tails' class probabilities."""
from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

import debugger  # smdebug hook when smdebug imports (debugger.py); else records nothing
import torch
from torch.utils.data import DistributedSampler

from trainer.checkpoint import load_checkpoint
from trainer.distributed import usable_cpus
from trainer.epoch import evaluate
from trainer.frozen import Tail, freeze_front
from trainer.loop import Session, seed_everything, train_epochs
from trainer.model import build, load_pretrained
from trainer.refit import out_of_fold
from trainer.report import TrainError


def train_tails(sessions: list[Session], model, fit, checkpoint: dict | None, refit: dict | None = None
                ) -> tuple[dict, list]:
    """--tails: train the tails on the one cached front, then combine them (tails_combined).
    `sessions` holds each tail's (the same one N times, or with --refit each tail's own photos:
    trainer.refit, whose `refit` record the combined model carries).

    On a CPU with 2 or more cores every tail trains at once, in a process of its own with its share
    of the cores (at least one thread): a tail's small 7x7 convolutions keep 2 threads half idle.
    The `real` profile's three tails on 2 cores, 1 thread each, train in 249 s against 395 s one
    after another on 2 threads (docs/benchmarks.md, "Tails side by side"). Elsewhere (a GPU, DDP)
    one after another. Each tail checkpoints and resumes on its own."""
    session = sessions[0]
    args = session.args
    parallel = session.device.type == "cpu" and session.place.world == 1 and usable_cpus() >= 2
    threads, share = torch.get_num_threads(), max(1, usable_cpus() // args.tails)
    folder = Path(tempfile.mkdtemp(prefix="tails-")) if parallel else None
    context = torch.multiprocessing.get_context("fork")  # the cached front is shared, not copied
    workers = {member: context.Process(target=_tail_process, args=(sessions[member], member, folder, share),
                                       daemon=True)
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
                results.append(train_tail(sessions[member], member))
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
    return tails_combined(session, results, refit)


def train_tail(session: Session, member: int) -> dict:
    """Tail `member` (from 0) of --tails: the same start (the pretrained weights), its own seed,
    so a new head and its own draws of photos and views. Returns {"best", "history"}."""
    args, place = session.args, session.place
    seed = args.seed + 1000 * member
    seed_everything(seed + place.rank)
    place.log(f"tail {member + 1} of {args.tails}: seed {seed}")
    model = build(args)
    load_pretrained(model, args.arch, args.pretrained, place.log)
    freeze_front(model.to(place.device), args.frozen_blocks)
    if isinstance(session.train_loader.sampler, DistributedSampler):
        session.train_loader.sampler.seed = seed  # its own order of photos
    checkpoint = load_checkpoint(session.member_checkpoint(member), args, session.n_train, place.log)
    best, history = train_epochs(session, model, Tail(model, args.frozen_blocks).to(place.device), checkpoint, member)
    return {"best": best, "history": history}


def _tail_process(session: Session, member: int, folder: Path, threads: int) -> None:
    """A forked process that trains one tail on `threads` threads and leaves it in `folder` for the parent."""
    session.place = dataclasses.replace(session.place, prefix=f"tail {member + 1}| ")  # this process's lines
    torch.set_num_threads(threads)
    try:
        torch.save(train_tail(session, member), folder / f"tail{member + 1}.pt")
    except TrainError as exc:
        session.place.log(f"error: {exc}")
        os._exit(2)
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)
    sys.stdout.flush()
    os._exit(0)  # no atexit handlers of the parent's (smdebug's, multiprocessing's) in a fork


def tails_combined(session: Session, members: list[dict], refit: dict | None = None) -> tuple[dict, list]:
    """The tails' kept epochs as one SharedFront (the front stored once), scored on the validation
    split as it will be served: the members' class probabilities averaged; with --refit (`refit`:
    trainer.refit's record of the parts) each validation photo as the tail that did not train on
    it answered it instead (trainer.refit.out_of_fold). Returns (best, history) as for one model;
    the history holds each tail's epochs in turn, marked with its `member`."""
    args = session.args
    ensemble = build(args, tails=len(members), shared_blocks=args.frozen_blocks)
    wanted = ensemble.state_dict()
    state = {f"members.{i}.{name}": tensor for i, m in enumerate(members)
             for name, tensor in m["best"]["state_dict"].items() if f"members.{i}.{name}" in wanted}
    ensemble.load_state_dict(state)  # strict: every member's tail, and the front once
    alone = ", ".join(f"{m['best']['metrics']['accuracy']:.4f}" for m in members)
    if refit:
        val = out_of_fold(members, refit["parts_of"], session.place, args.decode)
        outputs = val.pop("outputs")
        session.place.log(f"tails: {len(members)} refit, out of fold validation:accuracy={val['accuracy']:.4f} "
                          f"validation:rmse={val['rmse']:.4f} (each on its own part: accuracy {alone})")
    else:
        ensemble.to(session.device, memory_format=torch.channels_last)
        val = evaluate(Tail(ensemble, args.frozen_blocks), session.val_loader, session.val_steps, session.place,
                       session.dtype, args.head, args.decode, "none")
        outputs = session.place.gathered(val.pop("outputs"))
        session.place.log(f"tails: {len(members)} averaged, validation:accuracy={val['accuracy']:.4f} "
                          f"validation:rmse={val['rmse']:.4f} (each alone: accuracy {alone})")
    best = {"epoch": [m["best"]["epoch"] for m in members], "accuracy": val["accuracy"], "metrics": val,
            "state_dict": state, "outputs": outputs}
    if refit:
        best["refit"] = {k: v for k, v in refit.items() if k != "parts_of"}
    return best, [{**entry, "member": index} for index, m in enumerate(members) for entry in m["history"]]
