"""The local Debugger rule verdicts: each fires on the history that shows its problem, none on a healthy run."""
from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import import_script

rules = import_script("evaluate", "rules")


def healthy(steps: int = 60) -> dict:
    """Per-step losses falling like a real run's (with batch noise), a small train/val gap, sane gradients."""
    rng = np.random.default_rng(0)
    train = [[s, 1.6 * math.exp(-s / 30) + 0.2 + rng.normal(0, 0.01)] for s in range(steps)]
    validation = [[s, 1.6 * math.exp(-s / 30) + 0.22] for s in range(9, steps, 10)]
    gradients = {"fc.weight": [[s, rng.normal(0, 1e-2, (5, 8))] for s in range(0, steps, 10)],
                 "conv1.weight": [[s, rng.normal(0, 1e-3, (4, 3, 3, 3))] for s in range(0, steps, 10)]}
    tensors = {"fc.weight": [[s, rng.normal(0, 0.1, (5, 8))] for s in range(0, steps, 10)]}
    return {"losses": {"train": train, "validation": validation}, "gradients": gradients, "tensors": tensors}


def verdicts(history: dict) -> dict[str, str]:
    return {v.rule: v.status for v in rules.evaluate_rules(history)}


def test_a_healthy_run_raises_no_rule():
    found = {v.rule: v for v in rules.evaluate_rules(healthy())}
    assert {name: v.status for name, v in found.items()} == dict.fromkeys(rules.RULES, rules.NO_ISSUES), \
        {name: v.message for name, v in found.items()}


def test_loss_not_decreasing_fires_on_a_rising_loss():
    history = healthy()
    history["losses"]["train"] = [[s, 1.0 + 0.01 * s] for s in range(60)]
    history["losses"]["validation"] = [[s, 1.02 + 0.01 * s] for s in range(9, 60, 10)]
    verdict = rules.evaluate_rules(history)[0]
    assert verdict.rule == "LossNotDecreasing" and verdict.status == rules.ISSUES
    assert verdict.step == 10  # the first check: step 10 against step 0
    assert verdicts(history)["Overfit"] == rules.NO_ISSUES  # one problem, one rule


def test_loss_not_decreasing_fires_on_a_flat_loss_and_respects_diff_percent():
    flat = [[s, 1.0 - 0.0001 * s] for s in range(40)]  # about 0.1% lower every 10 steps
    assert rules.loss_not_decreasing(flat, diff_percent=0.5).status == rules.ISSUES
    assert rules.loss_not_decreasing(flat, diff_percent=0.01).status == rules.NO_ISSUES


def test_loss_not_decreasing_needs_num_steps_of_history():
    assert rules.loss_not_decreasing([[0, 1.0], [5, 0.5]]).status == rules.NO_DATA
    assert rules.loss_not_decreasing([[0, 1.0], [5, 2.0]], num_steps=5).status == rules.ISSUES


def test_overfit_fires_on_a_train_validation_gap():
    history = healthy()
    history["losses"]["validation"] = [[s, 1.6 * math.exp(-s / 30) + 0.6] for s in range(9, 60, 10)]
    found = {v.rule: v for v in rules.evaluate_rules(history)}
    assert found["Overfit"].status == rules.ISSUES, found["Overfit"].message
    assert found["LossNotDecreasing"].status == rules.NO_ISSUES


def test_overfit_patience_needs_the_gap_in_a_row():
    train = [[s, 1.0] for s in range(10)]
    once = [[1, 1.5], [3, 1.0], [5, 1.5], [7, 1.0]]  # a 50% gap, never twice in a row
    assert rules.overfit(train, once, patience=2).status == rules.NO_ISSUES
    assert rules.overfit(train, once, patience=1).status == rules.ISSUES
    assert rules.overfit(train, once, patience=1, start_step=6).status == rules.NO_ISSUES


def test_vanishing_gradient_fires_on_near_zero_gradients():
    history = healthy()
    history["gradients"]["conv1.weight"][3][1] = np.full((4, 3, 3, 3), 1e-9)
    found = {v.rule: v for v in rules.evaluate_rules(history)}
    assert found["VanishingGradient"].status == rules.ISSUES
    assert "conv1.weight" in found["VanishingGradient"].message and found["VanishingGradient"].step == 30
    assert found["ExplodingTensor"].status == rules.NO_ISSUES


@pytest.mark.parametrize("bad", [math.nan, math.inf, 3e39])
def test_exploding_tensor_fires_on_nan_and_huge_values(bad):
    history = healthy()
    weights = np.ones((5, 8), dtype=np.float32)
    with np.errstate(over="ignore"):
        weights[2, 3] = np.float32(bad)  # 3e39 does not fit float32: it overflows to inf, as in training
    history["tensors"]["fc.weight"][2][1] = weights
    found = {v.rule: v for v in rules.evaluate_rules(history)}
    assert found["ExplodingTensor"].status == rules.ISSUES and found["ExplodingTensor"].step == 20


def test_exploding_tensor_sees_a_nan_loss_and_only_nan_ignores_infinity():
    history = healthy()
    history["losses"]["train"][-1][1] = math.nan
    assert verdicts(history)["ExplodingTensor"] == rules.ISSUES
    assert rules.exploding_tensor({"t": [[0, [1.0, math.inf]]]}, only_nan=True).status == rules.NO_ISSUES
    assert rules.exploding_tensor({"t": [[0, [1.0, math.inf]]]}).status == rules.ISSUES


def test_missing_data_is_said_not_passed():
    found = {v.rule: v for v in rules.evaluate_rules(rules.history_from_epochs([]))}
    assert {v.status for v in found.values()} == {rules.NO_DATA}
    epochs = [{"epoch": e, "train": {"loss": 2.0 / e}, "validation": {"loss": 2.1 / e}} for e in range(1, 16)]
    found = {v.rule: v for v in rules.evaluate_rules(rules.history_from_epochs(epochs))}
    assert found["LossNotDecreasing"].status == rules.NO_ISSUES
    assert found["Overfit"].status == rules.NO_ISSUES
    assert found["VanishingGradient"].status == rules.NO_DATA  # no gradients without smdebug
