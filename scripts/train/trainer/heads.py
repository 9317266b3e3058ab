"""The counting heads (inference.make_head: classify or ordinal) as training sees them: their
loss, their outputs under test-time flips, and the scores of the counts decoded from them."""
from __future__ import annotations

import math

import inference
import torch

from trainer.data import LABELS


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
    """The model's outputs, averaged over the 4 flips of each image with tta "flips" (or
    "flips+crops": the crops are served, not validated)."""
    outputs = model(images)
    if not inference.tta_has(tta, "flips"):
        return outputs
    flips = (images.flip(-1), images.flip(-2), images.flip(-1).flip(-2))
    return torch.stack([outputs, *(model(view) for view in flips)]).float().mean(0)


def scores(predicted: torch.Tensor, targets: torch.Tensor) -> dict:
    """Accuracy, RMSE in items and each count's recall (nan for a count with no photo) of
    predicted class indices."""
    labels = torch.tensor(LABELS, dtype=torch.float32)
    per_class = [float((predicted[targets == c] == c).float().mean()) if (targets == c).any() else math.nan
                 for c in range(len(LABELS))]
    return {"accuracy": float((predicted == targets).float().mean()),
            "rmse": float(((labels[predicted] - labels[targets]) ** 2).mean().sqrt()), "per_class": per_class}
