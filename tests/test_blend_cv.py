"""benchmarks/real_blend_cv.py: the scores docs/model.md quotes for blends come from these parts."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def benchmark(name: str):
    """benchmarks/<name>.py, imported under the name its siblings import it by (they run as
    scripts, with their folder first on sys.path): import a benchmark's siblings before it."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


real_cv = benchmark("real_cv")
real_blend_cv = benchmark("real_blend_cv")


def one_hot(counts: list[int], confidence: float = 0.9) -> torch.Tensor:
    rest = (1 - confidence) / 4
    p = torch.full((len(counts), 5), rest)
    p[torch.arange(len(counts)), torch.tensor(counts)] = confidence
    return p


def test_decodings_and_fold_scores_by_hand():
    p = torch.tensor([[0.1, 0.2, 0.3, 0.2, 0.2],    # median 2, expected 2.2 -> 2
                      [0.6, 0.0, 0.0, 0.0, 0.4],    # median 0, expected 1.6 -> 2
                      [0.0, 0.0, 0.0, 0.45, 0.55]])  # median 4, expected 3.55 -> 4
    assert real_blend_cv.decode_counts(p, "median").tolist() == [2, 0, 4]
    assert real_blend_cv.decode_counts(p, "mean").tolist() == [2, 2, 4]
    labels, folds = torch.tensor([2, 1, 3]), torch.tensor([0, 0, 1])
    scores = real_blend_cv.cross_validated(p, labels, folds, "median")
    # fold 0: right, off by 1 -> accuracy 0.5, RMSE sqrt(1/2); fold 1: off by 1 -> 0, 1.
    assert scores["folds"] == 2
    assert scores["accuracy"] == pytest.approx(0.25)
    assert scores["rmse"] == pytest.approx((math.sqrt(0.5) + 1) / 2)


def test_a_fold_with_a_missing_photo_is_left_out():
    p = one_hot([0, 1, 2, 3])
    p[3] = math.nan  # fold 1 was cut short
    scores = real_blend_cv.cross_validated(p, torch.tensor([0, 1, 2, 0]), torch.tensor([0, 0, 1, 1]), "median")
    assert scores["folds"] == 1 and scores["accuracy"] == 1.0


def test_out_of_fold_files_round_trip_and_blend_in_photo_order(tmp_path):
    labels = torch.tensor([0, 1, 2, 3, 4, 2])
    photos = [f"{c + 1}/{i:05d}.jpg" for i, c in enumerate(labels.tolist())]
    folds = torch.tensor([0, 1, 0, 1, 0, 1])
    probabilities = one_hot([0, 1, 2, 3, 4, 1])
    real_blend_cv.write_out_of_fold(tmp_path / "a.json", "a", {}, [f"/data/{p}" for p in photos], labels, folds,
                                    {"none": probabilities, "flips": probabilities.flip(0)})
    a = real_blend_cv.oof_source(tmp_path / "a.json", "none")
    assert a.photos == photos and torch.equal(a.folds, folds)
    assert torch.allclose(a.probabilities, probabilities, atol=1e-5)
    assert real_blend_cv.oof_source(tmp_path / "a.json", "flips").name == "a+tta"
    # The same photos in another order line up by name, not by position.
    order = [5, 4, 3, 2, 1, 0]
    b = real_blend_cv.Source("b", [photos[i] for i in order], labels[order], folds[order], probabilities[order])
    assert torch.allclose(real_blend_cv.aligned(b, a), a.probabilities)


def test_sources_of_other_folds_or_labels_are_refused():
    labels = torch.tensor([0, 1, 2, 3])
    photos = ["1/a.jpg", "2/b.jpg", "3/c.jpg", "4/d.jpg"]
    first = real_blend_cv.Source("first", photos, labels, torch.tensor([0, 0, 1, 1]), one_hot([0, 1, 2, 3]))
    other_folds = real_blend_cv.Source("other", photos, labels, torch.tensor([0, 1, 0, 1]), one_hot([0, 1, 2, 3]))
    with pytest.raises(SystemExit, match="other folds"):
        real_blend_cv.aligned(other_folds, first)
    relabelled = real_blend_cv.Source("relabelled", photos, torch.tensor([0, 1, 2, 2]), first.folds, first.probabilities)
    with pytest.raises(SystemExit, match="labels"):
        real_blend_cv.aligned(relabelled, first)
    fewer = real_blend_cv.Source("fewer", photos[:3], labels[:3], first.folds[:3], first.probabilities[:3])
    with pytest.raises(SystemExit, match="no probabilities for 1 photos"):
        real_blend_cv.aligned(fewer, first)


@pytest.mark.slow
def test_frozen_out_of_fold_probabilities_never_see_their_own_photo():
    """Each photo gets a feature of its own and a random label: a head that trained on the photo
    memorises it, one that did not is at chance. Out of fold must be the second."""
    g = torch.Generator().manual_seed(0)
    n = 200
    y = torch.randint(0, 5, (n,), generator=g)
    x = torch.eye(n).unsqueeze(1).repeat(1, 2, 1) + 0.01 * torch.randn(n, 2, n, generator=g)  # [photo, view, feature]
    cfg = {**real_blend_cv.FROZEN_HEAD, "weight_decay": 0.0, "lr": 0.05}
    oof = real_cv.out_of_fold(x, y, cfg)
    assert oof.shape == (n, 5) and torch.allclose(oof.sum(1), torch.ones(n), atol=1e-4)
    out_of_fold_accuracy = float((real_blend_cv.decode_counts(oof, "median") == y).float().mean())
    everything = torch.ones(n, dtype=torch.bool)
    _, in_sample = real_cv.fit_head(x, y, everything, everything, cfg)
    in_sample_accuracy = float((real_blend_cv.decode_counts(in_sample, "median") == y).float().mean())
    assert out_of_fold_accuracy < 0.3 and in_sample_accuracy > 0.8


@pytest.mark.slow
def test_the_frozen_head_learns_a_count_its_features_carry():
    """Features that carry the count (plus noise): train.py's head, trained and scored fold by fold
    with the trainer's parts, counts the held-out photos; mean decoding through the trainer's cuts."""
    g = torch.Generator().manual_seed(1)
    y = torch.arange(5).repeat(40)
    x = torch.randn(200, 2, 8, generator=g)
    x[:, :, 0] = y[:, None] + 0.1 * torch.randn(200, 2, generator=g)
    cfg = {**real_blend_cv.FROZEN_HEAD, "decode": "mean", "weight_decay": 0.0, "lr": 0.05}
    result = real_cv.run({"avg": x, "labels": y}, cfg)
    assert result["accuracy_mean"] > 0.9 and result["rmse_mean"] < 0.5
    assert len(result["folds_accuracy"]) == 5


def test_the_rest_chooses_the_most_accurate_setting_that_keeps_every_count():
    """real_choose_cv's rule: a count under 0.25 rules a setting out; accuracies within 0.01 tie,
    and the lower RMSE wins the tie."""
    real_choose_cv = benchmark("real_choose_cv")
    row = (lambda name, accuracy, rmse, low=0.3: {"name": name, "accuracy": accuracy, "rmse": rmse,
                                                  "per_class": [0.4, 0.3, low, 0.4, 0.3]})
    rows = [row("starves a count", 0.40, 1.00, low=0.24), row("best", 0.366, 1.20), row("tie", 0.358, 1.17),
            row("behind", 0.350, 1.10)]
    assert real_choose_cv.choose(rows)["name"] == "tie"
    assert real_choose_cv.choose([rows[0]]) is None


def test_every_setting_is_scored_over_every_combination_of_seeds(tmp_path):
    real_choose_cv = benchmark("real_choose_cv")
    labels = torch.tensor([0, 1, 2, 3, 4] * 4)
    folds = torch.tensor([0] * 10 + [1] * 10)
    right, wrong = one_hot(labels.tolist()), one_hot(((labels + 2) % 5).tolist())
    sources = {"none": [right, right, wrong], "flips": [wrong, wrong, wrong]}
    by = {(s["tails"], s["tta"], s["floor"]): real_choose_cv.score_setting(s, sources, labels, folds)
          for s in real_choose_cv.settings(3)}
    assert len(by) == 3 * 2 * 4
    one = by[(1, "none", 0.0)]  # seeds alone: two right, one wrong
    assert one["combinations"] == 3 and one["accuracy"] == pytest.approx(2 / 3) and one["lowest_accuracy"] == 0.0
    assert by[(3, "none", 0.0)]["combinations"] == 1
    assert by[(1, "flips", 0.2)]["accuracy"] == 0.0


def test_the_floors_cuts_can_be_fitted_on_other_views_than_the_served_ones():
    """--cuts-from: as Train fits an artifact's cuts over the flips and it serves over flips+crops.
    Served, count 5 sits at an expected 4.3 (rounded to 4); over the flips it is counted right,
    so cuts fitted there do not move and count 5 stays wrong, where cuts fitted on the served
    answers move and count it right."""
    real_choose_cv = benchmark("real_choose_cv")
    labels = torch.tensor([0, 1, 2, 3, 4] * 4)
    folds = torch.tensor([0] * 10 + [1] * 10)
    served = one_hot(labels.tolist())
    served[labels == 4] = torch.tensor([0.0, 0.0, 0.0, 0.7, 0.3])
    sources = {"flips+crops": [served], "flips": [one_hot(labels.tolist())]}
    setting = {"tails": 1, "tta": "flips+crops", "floor": 0.25}
    own = real_choose_cv.score_setting(setting, sources, labels, folds)
    from_flips = real_choose_cv.score_setting(setting, sources, labels, folds, cuts_from="flips")
    assert own["accuracy"] == 1.0 and own["per_class"][4] == 1.0
    assert from_flips["accuracy"] == pytest.approx(0.8) and from_flips["per_class"][4] == 0.0
