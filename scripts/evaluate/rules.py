"""SageMaker Debugger's four built-in training rules, computed locally from recorded histories.

The definitions and default parameters follow the built-in rules' documentation
(https://docs.aws.amazon.com/sagemaker/latest/dg/debugger-built-in-rules.html and smdebug's
first-party rule notes):

LossNotDecreasing  num_steps=10, diff_percent=0.1, increase_threshold_percent=5, mode=TRAIN.
    Every num_steps the loss at a step is compared with the loss at the newest recorded step at
    least num_steps behind it; the rule fires when it is not lower by at least diff_percent %.
    At those checks it also reports a loss that has been increasing: more than
    increase_threshold_percent % above the lowest loss checked so far.
Overfit            start_step=0, patience=1, ratio_threshold=0.1.
    From start_step on, (mean validation loss - mean training loss) / mean training loss is
    computed at each evaluation; the rule fires when it exceeds ratio_threshold for `patience`
    evaluations in a row.
VanishingGradient  threshold=1e-7.
    Fires when the mean of the absolute values of any gradient tensor at a step is below
    threshold.
ExplodingTensor    only_nan=False.
    Fires when any recorded tensor holds a non-finite value (NaN, and infinity unless only_nan).

A verdict is SageMaker's RuleEvaluationStatus vocabulary: "NoIssuesFound" or "IssuesFound",
plus "NoData" when the history holds nothing the rule reads (for example, no gradients were
recorded because smdebug was not installed). Standard library + numpy only.

History layout (what the Debugger trial or train.py's history.json is turned into):
    {"losses": {"train": [[step, value], ...], "validation": [[step, value], ...]},
     "gradients": {tensor_name: [[step, array_or_number], ...]},
     "tensors": {tensor_name: [[step, array_or_number], ...]}}
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

ISSUES, NO_ISSUES, NO_DATA = "IssuesFound", "NoIssuesFound", "NoData"

DEFAULTS = {
    "LossNotDecreasing": {"num_steps": 10, "diff_percent": 0.1, "increase_threshold_percent": 5.0,
                          "mode": "TRAIN"},
    "Overfit": {"start_step": 0, "patience": 1, "ratio_threshold": 0.1},
    "VanishingGradient": {"threshold": 1e-7},
    "ExplodingTensor": {"only_nan": False},
}
RULES = tuple(DEFAULTS)


@dataclass
class Verdict:
    rule: str
    status: str
    message: str
    parameters: dict = field(default_factory=dict)
    step: int | None = None  # the first step at which the rule fired

    def to_dict(self) -> dict:
        return asdict(self)


def _series(points) -> list[tuple[int, float]]:
    return sorted((int(s), float(v)) for s, v in points or [])


def loss_not_decreasing(losses, num_steps: int = 10, diff_percent: float = 0.1,
                        increase_threshold_percent: float = 5.0, mode: str = "TRAIN") -> Verdict:
    params = {"num_steps": num_steps, "diff_percent": diff_percent,
              "increase_threshold_percent": increase_threshold_percent, "mode": mode}
    series = _series(losses)
    name = "LossNotDecreasing"
    if len(series) < 2:
        return Verdict(name, NO_DATA, f"fewer than 2 {mode.lower()} loss values recorded", params)
    steps = [s for s, _ in series]
    values = dict(series)
    lowest = series[0][1]  # the lowest loss at the steps checked so far
    next_check = steps[0] + num_steps
    checks = 0
    for step, value in series[1:]:
        if step < next_check:
            continue
        reference_step = max(s for s in steps if s <= step - num_steps)
        reference = values[reference_step]
        lowest = min(lowest, reference)
        checks += 1
        if math.isfinite(lowest) and value > lowest * (1 + increase_threshold_percent / 100):
            return Verdict(name, ISSUES, f"loss rose to {value:.4g} at step {step}, more than "
                           f"{increase_threshold_percent}% above the lowest checked loss {lowest:.4g}",
                           params, step)
        if not value < reference * (1 - diff_percent / 100):
            return Verdict(name, ISSUES, f"loss at step {step} ({value:.4g}) is not {diff_percent}% below "
                           f"the loss at step {reference_step} ({reference:.4g})", params, step)
        lowest = min(lowest, value)
        next_check = step + num_steps
    if not checks:
        return Verdict(name, NO_DATA, f"{mode.lower()} losses span {steps[-1] - steps[0]} steps, fewer "
                       f"than num_steps={num_steps}", params)
    return Verdict(name, NO_ISSUES, f"loss decreased at each of {checks} checks "
                   f"({series[0][1]:.4g} -> {series[-1][1]:.4g})", params)


def overfit(train_losses, validation_losses, start_step: int = 0, patience: int = 1,
            ratio_threshold: float = 0.1) -> Verdict:
    """Validation points are compared with the mean training loss since the previous one."""
    params = {"start_step": start_step, "patience": patience, "ratio_threshold": ratio_threshold}
    train, val = _series(train_losses), _series(validation_losses)
    name = "Overfit"
    if not train or not val:
        return Verdict(name, NO_DATA, "training or validation losses missing", params)
    run, worst, compared, previous = 0, -math.inf, 0, -math.inf
    for step, val_loss in val:
        window = [v for s, v in train if previous < s <= step] or [v for s, v in train if s <= step]
        previous = step
        if step < start_step or not window:
            continue
        mean_train = float(np.mean(window))
        if mean_train <= 0:
            continue
        ratio = (val_loss - mean_train) / mean_train
        compared += 1
        worst = max(worst, ratio)
        run = run + 1 if ratio > ratio_threshold else 0
        if run >= patience:
            return Verdict(name, ISSUES, f"validation loss {val_loss:.4g} is {ratio:.0%} above the training "
                           f"loss {mean_train:.4g} at step {step} (threshold {ratio_threshold:.0%}, "
                           f"{run} evaluation(s) in a row)", params, step)
    if not compared:
        return Verdict(name, NO_DATA, f"no validation loss at or after start_step={start_step}", params)
    return Verdict(name, NO_ISSUES, f"largest validation/training gap {worst:.1%} over {compared} "
                   f"evaluations (threshold {ratio_threshold:.0%})", params)


def vanishing_gradient(gradients: dict, threshold: float = 1e-7) -> Verdict:
    params = {"threshold": threshold}
    name = "VanishingGradient"
    seen = 0
    for tensor, points in sorted((gradients or {}).items()):
        for step, value in sorted(points, key=lambda p: p[0]):
            values = np.abs(np.asarray(value, dtype=np.float64))
            if not values.size:
                continue
            seen += 1
            mean_abs = float(np.mean(values))
            if mean_abs < threshold:
                return Verdict(name, ISSUES, f"gradient {tensor} has mean |value| {mean_abs:.3g} at step "
                               f"{step}, below {threshold:g}", params, int(step))
    if not seen:
        return Verdict(name, NO_DATA, "no gradients recorded", params)
    return Verdict(name, NO_ISSUES, f"{len(gradients)} gradient tensors, {seen} recorded values, all "
                   f"with mean |value| >= {threshold:g}", params)


def exploding_tensor(tensors: dict, only_nan: bool = False) -> Verdict:
    params = {"only_nan": only_nan}
    name = "ExplodingTensor"
    seen = 0
    for tensor, points in sorted((tensors or {}).items()):
        for step, value in sorted(points, key=lambda p: p[0]):
            values = np.asarray(value, dtype=np.float64)
            seen += 1
            nan = int(np.isnan(values).sum())
            inf = 0 if only_nan else int(np.isinf(values).sum())
            if nan or inf:
                return Verdict(name, ISSUES, f"tensor {tensor} holds {nan} NaN and {inf} infinite value(s) "
                               f"at step {step}", params, int(step))
    if not seen:
        return Verdict(name, NO_DATA, "no tensors recorded", params)
    return Verdict(name, NO_ISSUES, f"{len(tensors)} tensors, {seen} recorded values, all finite", params)


def evaluate_rules(history: dict, parameters: dict | None = None) -> list[Verdict]:
    """All four verdicts for a history (layout in the module docstring)."""
    parameters = {rule: {**DEFAULTS[rule], **(parameters or {}).get(rule, {})} for rule in RULES}
    losses = history.get("losses") or {}
    ln = parameters["LossNotDecreasing"]
    mode_key = "train" if ln["mode"].upper() == "TRAIN" else "validation"
    # Every loss value is a tensor the ExplodingTensor rule watches too.
    tensors = {**{f"loss/{k}": v for k, v in losses.items() if v}, **(history.get("tensors") or {}),
               **{f"gradient/{k}": v for k, v in (history.get("gradients") or {}).items()}}
    return [
        loss_not_decreasing(losses.get(mode_key), **ln),
        overfit(losses.get("train"), losses.get("validation"), **parameters["Overfit"]),
        vanishing_gradient(history.get("gradients") or {}, **parameters["VanishingGradient"]),
        exploding_tensor(tensors, **parameters["ExplodingTensor"]),
    ]


def history_from_epochs(epochs: list[dict]) -> dict:
    """train.py's history.json epochs -> the rules' layout (one step per epoch, losses only). With
    several tails (train.py --tails), the first one's run, as the Debugger records it."""
    epochs = [e for e in epochs if e.get("member", 0) == 0]
    return {"losses": {
        "train": [[e["epoch"], e["train"]["loss"]] for e in epochs if "train" in e],
        "validation": [[e["epoch"], e["validation"]["loss"]] for e in epochs if "validation" in e],
    }}
