"""--refit: the tails (--tails N) also learn from the validation split, cross-fitted. The
validation photos are dealt into N seeded parts, stratified by count; tail k trains on the
training split and every part but part k, and predicts part k. Every validation photo is then
answered by the one tail that never trained on it: those out-of-fold answers are what the
validation metrics report and what --recall_floor fits its cuts on. The artifact serves the mean
of the tails, as without --refit. The test split is not a channel of the job: no tail sees it."""
from __future__ import annotations

import random
from pathlib import Path

import inference
import torch

from trainer.data import LABELS, BinImages
from trainer.distributed import Place
from trainer.features import cached_features, view_augmenter
from trainer.frozen import partial_fronts, tail_on_fronts
from trainer.heads import scores
from trainer.loop import Session
from trainer.report import TrainError


def photo_id(path: Path) -> str:
    """A photo's id: its file name without the suffix (`<count>/<id>.jpg`, as Preprocess writes it)."""
    return Path(path).stem


def validation_parts(samples: list, parts: int, seed: int) -> list[int]:
    """The part (0..parts-1) of each validation photo (path, class index): each count's photos, in
    the order of their ids, shuffled by `seed` and dealt in turn, the deal going on from one count
    to the next, so that every part holds each count's share and the parts differ by at most one
    photo. Depends on the photos and the seed only, not on the order they are listed in.
    Refuses a split with fewer photos than parts: a tail with no part to answer has no validation."""
    if len(samples) < parts:
        raise TrainError(f"--refit deals the validation split into one part per tail (--tails {parts}), so it "
                         f"needs at least {parts} validation photos; it has {len(samples)}")
    part = [0] * len(samples)
    dealt = 0
    for index in range(len(LABELS)):
        members = sorted((i for i, (_, c) in enumerate(samples) if c == index), key=lambda i: photo_id(samples[i][0]))
        random.Random(f"refit|{seed}|{LABELS[index]}").shuffle(members)
        for j, i in enumerate(members):
            part[i] = (dealt + j) % parts
        dealt += len(members)
    return part


def first_tail_images(n_train: int, parts: list[int]) -> int:
    """The photos the first tail trains on (what its checkpoint is keyed by)."""
    return n_train + sum(1 for p in parts if p != 0)


def refit_sessions(model, train_set: BinImages, val_set: BinImages, parts: list[int], args, place: Place,
                   config: dict, pretrained: str | None, ckpt_path: Path | None):
    """(the first tail's Tail of `model`, a Session per tail): tail k's training loader holds the
    cached views of the training photos and of the validation photos outside part k, its
    validation loader the validation photos of part k."""
    train_fronts, val_fronts, views = partial_fronts(model, train_set, val_set, args, place, config)
    # The validation photos also train: the same views as the training photos (the photo, then
    # draws of the training augmentation), cached beside them.
    val_views = cached_features(model, val_set, views, args, place, view_augmenter(args, val_set.transform))
    train_ids = [photo_id(p) for p, _ in train_set.samples]
    val_ids = [photo_id(p) for p, _ in val_set.samples]
    part_of = torch.tensor(parts)
    val_targets = torch.tensor(val_set.targets)
    fit, sessions, members = None, [], []
    for k in range(args.tails):
        learn, held = (part_of != k).nonzero().flatten(), (part_of == k).nonzero().flatten()
        targets = train_set.targets + val_targets[learn].tolist()
        tail, train_loader, val_loader = tail_on_fronts(
            model, torch.cat([train_fronts, val_views[learn]]), targets, val_fronts[held],
            val_targets[held].tolist(), args, place)
        if fit is None:
            fit = tail
        sessions.append(Session(args, place, train_loader, val_loader, targets, pretrained, ckpt_path))
        members.append({"member": k, "trained_on": train_ids + [val_ids[i] for i in learn.tolist()],
                        "predicted": [val_ids[i] for i in held.tolist()]})
        place.log(f"refit: tail {k + 1} of {args.tails} trains on {len(train_ids)} training and {len(learn)} "
                  f"validation photos (every part but part {k + 1}) and predicts part {k + 1} ({len(held)} photos)")
    return fit, sessions, {"parts": args.tails, "seed": args.seed, "parts_of": parts, "tails": members}


def out_of_fold(members: list[dict], parts: list[int], place: Place, decode: str) -> dict:
    """The validation split answered out of fold: each photo by the one tail that did not train on
    it (its kept epoch's outputs on its own part), scored as evaluate scores. Returns evaluate's
    metrics with "outputs": (class probabilities, targets) in the validation split's order."""
    part_of = torch.tensor(parts)
    probabilities = torch.zeros(len(parts), len(LABELS))
    targets = torch.zeros(len(parts), dtype=torch.long)
    for k, member in enumerate(members):
        held = (part_of == k).nonzero().flatten()
        # A rank scored held[rank::world] (data.sharded_loader); gathered, the ranks come one after another.
        order = torch.cat([held[rank::place.world] for rank in range(place.world)])
        p, t = member["best"]["outputs"]
        probabilities[order], targets[order] = p.float(), t
    predicted = inference.decode_counts(probabilities, decode)
    scored = scores(predicted, targets)
    loss = -probabilities.gather(1, targets[:, None]).clamp_min(1e-7).log().mean()
    return {"loss": float(loss), "accuracy": scored["accuracy"], "rmse": scored["rmse"], "images": len(parts),
            "outputs": (probabilities, targets)}
