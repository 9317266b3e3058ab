"""--recall_floor (pipeline parameter RecallFloor): the rounded expected count starves the end
counts, so Train moves the two end cuts of mean decoding just far enough that count 1 and count 5
reach the floor on the validation split, and the artifact serves with those cuts."""
from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import import_script
from pipeline.dag.parameters import check_combination, validate
from pipeline.dag.profiles import defaults
from test_partial_finetune import ARGS, squares  # noqa: F401 (fixture)
from test_train import FAST, data, load_serving, run_train, train_main  # noqa: F401 (fixture)

inference = import_script("inference", "inference")
DEFAULT = [0.5, 1.5, 2.5, 3.5]  # written out: what inference.rounding_cuts(5) must be


def recall(predicted: torch.Tensor, targets: torch.Tensor, c: int) -> float:
    return float((predicted[targets == c] == c).float().mean())


def peaked(indices: list[float]) -> torch.Tensor:
    """Class probabilities whose expected index is each of `indices` (mass on two neighbours)."""
    rows = torch.zeros(len(indices), 5)
    for row, e in zip(rows, indices):
        low = min(int(math.floor(e)), 3)
        row[low], row[low + 1] = low + 1 - e, e - low
    return rows


def test_default_cuts_are_rounding():
    assert inference.rounding_cuts(5) == DEFAULT
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(500, 5) * 2, 1)
    assert torch.equal(inference.decode_counts(p, "mean", DEFAULT), inference.decode_counts(p, "mean"))


def test_the_top_cut_moves_just_far_enough():
    # Ten count-5 photos, expected indices 3.0..3.9: plain rounding answers 5 for 3.6-3.9 (4 of 10).
    top = [3.0 + i / 10 for i in range(10)]
    p, y = peaked(top + [2.0, 0.0]), torch.tensor([4] * 10 + [2, 0])
    assert recall(inference.decode_counts(p, "mean"), y, 4) == pytest.approx(0.4)
    cuts = inference.floor_cuts(p, y, 0.6)  # 6 of 10: the 6th highest is 3.4, the next 3.3
    assert cuts[:3] == DEFAULT[:3] and cuts[3] == pytest.approx(3.35)
    assert recall(inference.decode_counts(p, "mean", cuts), y, 4) == pytest.approx(0.6)
    assert inference.floor_cuts(p, y, 0.4) == DEFAULT  # reached already: nothing moves
    # A floor the model cannot reach within half a class: the cut stops at 3.0 (count 4.0).
    assert inference.floor_cuts(p, y, 1.0)[3] == 3.0


def test_the_bottom_cut_moves_for_count_1():
    bottom = [0.2 + i / 10 for i in range(8)]  # 0.2..0.9: rounding answers 1 for 0.2-0.5 (4 of 8)
    p, y = peaked(bottom + [4.0]), torch.tensor([0] * 8 + [4])
    cuts = inference.floor_cuts(p, y, 0.75)  # 6 of 8: the 6th lowest is 0.7, the next 0.8
    assert cuts[0] == pytest.approx(0.75) and cuts[1:] == DEFAULT[1:]
    assert recall(inference.decode_counts(p, "mean", cuts), y, 0) == pytest.approx(0.75)


def test_ties_and_absent_classes():
    p, y = peaked([3.2, 3.2, 3.2, 3.2]), torch.tensor([4, 4, 4, 4])
    cuts = inference.floor_cuts(p, y, 0.5)  # every photo on the same value: all of them go over
    assert recall(inference.decode_counts(p, "mean", cuts), y, 4) == 1.0
    p, y = peaked([1.0, 2.0]), torch.tensor([1, 2])  # no count 1 or 5 among them: nothing to move
    assert inference.floor_cuts(p, y, 0.5) == DEFAULT


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 4), st.integers(0, 4)), min_size=1, max_size=60), st.floats(0.01, 0.99))
def test_floor_cuts_property(rows, floor):
    p, y = peaked([e for e, _ in rows]), torch.tensor([c for _, c in rows])
    cuts = inference.floor_cuts(p, y, floor)
    assert cuts[1:3] == DEFAULT[1:3] and 3.0 <= cuts[3] <= 3.5 and 0.5 <= cuts[0] <= 1.0
    predicted = inference.decode_counts(p, "mean", cuts)
    for c, cut, bound in ((4, 3, 3.0), (0, 0, 1.0)):
        if (y == c).any():  # reached, or its cut went as far as it may
            assert recall(predicted, y, c) >= floor - 1e-9 or cuts[cut] == bound
            if cuts[cut] != DEFAULT[cut]:  # it moved only because rounding missed the floor
                assert recall(inference.decode_counts(p, "mean"), y, c) < floor


def test_served_cuts_are_on_the_count():
    config = {"labels": [1, 2, 3, 4, 5], "cuts": [1.5, 2.5, 3.5, 4.41]}
    assert inference.served_cuts(config) == pytest.approx([0.5, 1.5, 2.5, 3.41])
    assert inference.served_cuts({"labels": [1, 2, 3, 4, 5]}) is None
    for bad in ([1.5, 2.5, 3.5], [1.5, 3.5, 2.5, 4.5], [1.5, 2.5, 3.5, float("nan")], "1.5,2.5,3.5,4.5"):
        with pytest.raises(ValueError, match="cuts must be 4 ascending numbers"):
            inference.served_cuts({**config, "cuts": bad})


@pytest.mark.slow
def test_train_fits_the_cuts_and_the_artifact_serves_them(tmp_path, squares):  # noqa: F811
    done = run_train(tmp_path, squares, *ARGS, "--recall_floor", "0.99",
                     env={"INVMON_FEATURE_CACHE": str(tmp_path / "cache")})
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("recall floor 0.99: cuts")]
    model_dir = tmp_path / "model"
    config = json.loads((model_dir / "model_config.json").read_text())
    cuts = config["cuts"]
    assert cuts[1:3] == [2.5, 3.5] and 4.0 <= cuts[3] <= 4.5 and 1.5 <= cuts[0] <= 2.0
    assert f"cuts on the expected count {', '.join(f'{c:g}' for c in cuts)} " in line
    assert config["hyperparameters"]["recall_floor"] == 0.99

    # Served through the artifact's own code: the answers are the expected count decoded with the
    # cuts, they score the validation split as the job reported, and count 1 and 5 reached the
    # floor or their cut went as far as it may.
    serving = load_serving(model_dir)
    model = serving.model_fn(str(model_dir))
    photos = sorted(squares["validation"].glob("*/*.jpg"))
    answers = serving.predict_fn([serving.input_fn(p.read_bytes(), "image/jpeg") for p in photos], model)
    truth = torch.tensor([int(p.parent.name) - 1 for p in photos])
    probabilities = torch.tensor([[a["probabilities"][str(c)] for c in range(1, 6)] for a in answers])
    served = torch.tensor([a["count"] - 1 for a in answers])
    index_cuts = [c - 1 for c in cuts]
    assert torch.equal(served, inference.decode_counts(probabilities, "mean", index_cuts))
    accuracy = float((served == truth).float().mean())
    assert accuracy == pytest.approx(config["validation"]["accuracy"], abs=1.5 / len(photos))
    assert recall(served, truth, 4) > 0.98 or cuts[3] == 4.0
    assert recall(served, truth, 0) > 0.98 or cuts[0] == 2.0
    plain = inference.decode_counts(probabilities, "mean")
    if cuts != [1.5, 2.5, 3.5, 4.5]:  # a cut that moved changed an answer (the one it moved for)
        assert not torch.equal(served, plain)


@pytest.mark.slow
def test_recall_floor_needs_mean_decoding(tmp_path, squares, monkeypatch):  # noqa: F811
    median = [a if a != "mean" else "median" for a in ARGS]
    done = train_main(monkeypatch, tmp_path, squares, *median, "--recall_floor", "0.2")
    assert done.returncode == 2 and "--recall_floor: moves the cuts of --decode mean, not median" in done.stderr
    values = defaults("real")
    assert values["RecallFloor"] == 0.25
    check_combination(values)
    with pytest.raises(ValueError, match="RecallFloor=0.25 moves the cuts of Decode=mean, not median"):
        check_combination({**values, "Decode": "median"})
    with pytest.raises(ValueError, match="RecallFloor=1.5 refused: RecallFloor takes 0 to 0.9"):
        validate({**values, "RecallFloor": 1.5})


@pytest.mark.slow
def test_a_checkpoint_without_validation_outputs_is_refused_by_name(tmp_path, data, monkeypatch):  # noqa: F811
    """A job resumed from a checkpoint written before train.py kept the kept epoch's validation
    outputs has nothing to fit the cuts on: it says so, with no traceback (the first job through
    train.main in this process; the refusal as the container's process)."""
    args = [*FAST, "--epochs", "1", "--decode", "mean", "--pretrained", "none", "--workers", "0",
            "--checkpoint_dir", str(tmp_path / "ckpt")]
    first = train_main(monkeypatch, tmp_path / "first", data, *args)
    assert first.returncode == 0, first.stderr[-3000:]
    path = tmp_path / "ckpt" / "checkpoint.pth"
    checkpoint = torch.load(path, weights_only=True)
    assert "outputs" in checkpoint["best"]
    del checkpoint["best"]["outputs"]
    torch.save(checkpoint, path)
    done = run_train(tmp_path / "again", data, *args, "--recall_floor", "0.2", expect_ok=False)
    assert "checkpoint already holds all 1 epochs" in done.stdout
    assert done.returncode != 0 and "the checkpoint's kept epoch holds no validation outputs" in done.stdout + done.stderr
    assert "Traceback" not in done.stderr
