"""One pass over the data: a training epoch, or the scoring of the validation split, each on
this rank's share and summed over the ranks; mixed precision on CUDA."""
from __future__ import annotations

import itertools
import math
import time

import debugger  # smdebug hook when smdebug imports (debugger.py); else records nothing
import inference
import torch

from trainer.data import LABELS
from trainer.distributed import Place
from trainer.heads import count_loss, with_flips
from trainer.report import PROGRESS_SECONDS


def amp_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    """The autocast dtype on CUDA; None (full precision) on the CPU, where --amp does not apply."""
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "auto":
        amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return torch.bfloat16 if amp == "bf16" else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def to_device(batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    images, targets = batch
    images = images.to(device, non_blocking=True)
    if device.type == "cuda" and images.dim() == 4:  # channels_last: faster convolutions on tensor cores
        images = images.contiguous(memory_format=torch.channels_last)
    return images, targets.to(device, non_blocking=True)


def mixup_partners(n: int, alpha: float, device: torch.device) -> tuple[float, torch.Tensor | None]:
    """--mixup: each input mixed with another of the batch, its share drawn from Beta(alpha, alpha)
    (with --frozen_blocks the frozen part's outputs are mixed: manifold mixup); (1.0, None) when off."""
    if not alpha or n < 2:
        return 1.0, None
    share = float(torch.distributions.Beta(alpha, alpha).sample())
    return share, torch.randperm(n).to(device)


def train_one_epoch(model, loader, steps: int, optimizer, scheduler, scaler, place: Place, dtype, args, epoch: int,
                    class_weight: torch.Tensor | None = None) -> dict:
    """`steps` optimizer steps on `loader`'s batches; returns the epoch's training loss, accuracy
    (decoded with --decode) and images per second, summed over the ranks."""
    model.train()
    device, head, decode = place.device, args.head, args.decode
    # Sums stay on the device: a .item() per step would stall a GPU every batch.
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    start = last_report = time.perf_counter()
    for step, batch in enumerate(itertools.islice(loader, steps), start=1):
        images, targets = to_device(batch, device)
        share, partner = mixup_partners(len(targets), args.mixup, device)
        if partner is not None:
            images = share * images + (1 - share) * images[partner]
        with autocast(device, dtype):
            logits = model(images)
            loss = count_loss(logits, targets, head, class_weight, args.label_smoothing)
            if partner is not None:  # the loss is linear in the targets: the mixed photo's targets
                loss = share * loss + (1 - share) * count_loss(logits, targets[partner], head, class_weight,
                                                               args.label_smoothing)
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
            place.log(f"progress epoch={epoch}/{args.epochs} batch={step}/{steps} "
                      f"loss={loss_sum.item() / seen:.4f} lr={optimizer.param_groups[0]['lr']:.5f} "
                      f"images_per_sec={seen / (now - start):.1f}")
    seconds = time.perf_counter() - start
    loss_sum, correct, seen = place.all_sum([loss_sum.item(), correct.item(), seen])
    return {"loss": loss_sum / seen, "accuracy": correct / seen,
            "images_per_sec": seen / seconds if seconds else 0.0, "images": int(seen)}


@torch.inference_mode()
def evaluate(model, loader, steps: int, place: Place, dtype, head: str, decode: str, tta: str = "none") -> dict:
    """Loss, accuracy and RMSE over `steps` batches of `loader`, summed over the ranks, and this
    rank's "outputs": (class probabilities, targets)."""
    model.eval()
    device = place.device
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
    loss_sum, correct, squared, seen = place.all_sum([loss_sum, correct, squared, seen])
    # "outputs": this rank's photos, for --recall_floor; the caller pops them (history is JSON).
    return {"loss": loss_sum / seen, "accuracy": correct / seen, "rmse": math.sqrt(squared / seen),
            "images": int(seen), "outputs": (torch.cat(kept_probabilities), torch.cat(kept_targets))}

