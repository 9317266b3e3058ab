"""What trains on the output of a frozen part, computed once (trainer.features): a head on the
frozen backbone's pooled features (--freeze_backbone, ViewMean), or the blocks after the frozen
ones (--frozen_blocks, Tail)."""
from __future__ import annotations

import itertools

import inference
import torch
from torch.utils.data import Dataset, TensorDataset

from trainer.data import BinImages, sharded_loader, shuffled_loader
from trainer.distributed import Place
from trainer.features import frozen_outputs
from trainer.model import head_name
from trainer.report import TrainError


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


def frozen_part(model, first_block: int) -> list:
    """An EfficientNet's stem and the blocks before `first_block`: what --frozen_blocks keeps."""
    return [model._conv_stem, model._bn0, *model._blocks[:first_block]] if first_block > 0 else []


def freeze_front(model, first_block: int) -> None:
    for module in frozen_part(model, first_block):
        module.requires_grad_(False)
    model.to(memory_format=torch.channels_last)  # faster convolutions on CPUs too


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
        out = inference.tail(self.model, self.first_block, x)
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


def frozen_setup(model, train_set: BinImages, val_set: BinImages, args, place: Place, config: dict):
    """Freeze the backbone and return (head module to train, train loader, validation loader) over
    its features: training on `feature_views` views of every photo (the photo, then augmented
    ones), validation on the photo as is, or averaged over its 4 flips with --tta flips."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    head = getattr(model, head_name(args.arch))
    for parameter in head.parameters():
        parameter.requires_grad_(True)
    train_features, val_features, views = frozen_outputs(model, train_set, val_set, args, place, config)
    fit, train_loader, val_loader = head_on_features(head, train_features, train_set.targets, val_features,
                                                     val_set.targets, args, place)
    place.log(f"frozen backbone: training the {args.head} head on {len(train_loader.dataset)} feature vectors "
              f"({len(train_set)} photos x {views} views)")
    return fit, train_loader, val_loader


def head_on_features(head: torch.nn.Module, train_features: torch.Tensor, train_targets: list[int],
                     val_features: torch.Tensor, val_targets: list[int], args, place: Place):
    """(ViewMean of `head`, train loader, validation loader) over pooled features: [N, V, D] views
    of each training photo, each a sample of its own; [N, D] or [N, V, D] (views averaged) for
    validation."""
    views = train_features.shape[1]
    targets = torch.tensor(train_targets)
    train_data = TensorDataset(train_features.flatten(0, 1), targets.repeat_interleave(views))
    val_data = TensorDataset(val_features, torch.tensor(val_targets))
    train_loader = shuffled_loader(train_data, args.batch_size, args.seed, place)
    val_loader = sharded_loader(val_data, args.batch_size, place)
    flat = train_features.flatten(0, 1)
    mean, std = flat.mean(0), flat.std(0).clamp_min(1e-6)
    return ViewMean(head, mean, std).to(place.device), train_loader, val_loader


def partial_setup(model, train_set: BinImages, val_set: BinImages, args, place: Place, config: dict):
    """--frozen_blocks: freeze the stem and the first blocks, and return (the Tail to train, train
    loader, validation loader) over their cached output."""
    train_fronts, val_fronts, _ = partial_fronts(model, train_set, val_set, args, place, config)
    return tail_on_fronts(model, train_fronts, train_set.targets, val_fronts, val_set.targets, args, place)


def partial_fronts(model, train_set: BinImages, val_set: BinImages, args, place: Place, config: dict):
    """--frozen_blocks: freeze the stem and the first blocks; (their cached output for the training
    photos' views, for the validation photos as scored, the views of each training photo)."""
    if args.frozen_blocks >= len(model._blocks):
        raise TrainError(f"--frozen_blocks {args.frozen_blocks}: {args.arch} has {len(model._blocks)} blocks, "
                         f"so at most {len(model._blocks) - 1} can be frozen")
    freeze_front(model, args.frozen_blocks)
    train_fronts, val_fronts, views = frozen_outputs(model, train_set, val_set, args, place, config)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    place.log(f"frozen stem and blocks 0-{args.frozen_blocks - 1}: training blocks {args.frozen_blocks}-"
              f"{len(model._blocks) - 1}, the head conv and the {args.head} head ({trained / 1e6:.2f}M weights) "
              f"on their input, cached for {len(train_set)} photos x {views} views")
    return train_fronts, val_fronts, views


def tail_on_fronts(model, train_fronts: torch.Tensor, train_targets: list[int], val_fronts: torch.Tensor,
                   val_targets: list[int], args, place: Place):
    """(Tail of `model` after --frozen_blocks, train loader, validation loader) over the frozen
    part's output. Each epoch shows every training photo once, under one of its [N, V, C, H, W]
    cached views drawn at random; validation averages its views ([N, V, C, H, W]) or has one."""
    train_loader = shuffled_loader(RandomView(train_fronts, train_targets), args.batch_size, args.seed, place)
    val_data = TensorDataset(val_fronts, torch.tensor(val_targets))
    val_loader = sharded_loader(val_data, args.batch_size, place)
    return Tail(model, args.frozen_blocks).to(place.device), train_loader, val_loader
