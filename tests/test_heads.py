"""The counting heads: ordinal decoding, probabilities, losses, and serving an ordinal model."""
from __future__ import annotations

import json
import math
import random

import inference
import pytest
import torch

from trainer import heads


def test_ordinal_probabilities_are_a_distribution_whatever_the_parameters():
    torch.manual_seed(0)
    head = inference.OrdinalHead(16, 5)
    with torch.no_grad():
        head.gaps.copy_(torch.tensor([-3.0, 0.0, 4.0]))  # raw gaps may be anything: softplus > 0
    thresholds = head.thresholds()
    assert torch.all(thresholds[1:] > thresholds[:-1])
    outputs = head(torch.randn(64, 16) * 5)
    assert outputs.shape == (64, 4)
    p = inference.class_probabilities(outputs, "ordinal")
    assert p.shape == (64, 5) and torch.all(p >= 0)
    assert torch.allclose(p.sum(1), torch.ones(64), atol=1e-6)


def test_ordinal_probabilities_from_cumulative_logits():
    # P(count > k) = 0.9, 0.6, 0.3, 0.1 -> P(1..5) = 0.1, 0.3, 0.3, 0.2, 0.1
    above = torch.tensor([[0.9, 0.6, 0.3, 0.1]])
    p = inference.class_probabilities(torch.logit(above), "ordinal")
    assert torch.allclose(p, torch.tensor([[0.1, 0.3, 0.3, 0.2, 0.1]]), atol=1e-6)


@pytest.mark.parametrize("probabilities, argmax, median, mean", [
    ([0.1, 0.3, 0.3, 0.2, 0.1], 1, 2, 2),      # ties go to the lower count; cumulative 0.4, 0.7 -> 3rd
    ([0.45, 0.0, 0.0, 0.0, 0.55], 4, 4, 2),    # bimodal: median where the mass reaches 1/2; mean 2.2
    ([0.3, 0.0, 0.1, 0.3, 0.3], 0, 3, 2),      # expected index 2.3
    ([1.0, 0.0, 0.0, 0.0, 0.0], 0, 0, 0),
    ([0.0, 0.0, 0.0, 0.0, 1.0], 4, 4, 4),
    ([0.25, 0.25, 0.0, 0.0, 0.5], 4, 1, 2),    # cumulative reaches exactly 0.5 at the 2nd count; mean 2.25
])
def test_decoding(probabilities, argmax, median, mean):
    p = torch.tensor([probabilities])
    assert int(inference.decode_counts(p, "argmax")) == argmax
    assert int(inference.decode_counts(p, "median")) == median
    assert int(inference.decode_counts(p, "mean")) == mean


def test_median_of_ordinal_head_is_the_number_of_thresholds_passed():
    """For cumulative logits the median count is 1 + #{k : P(count > k) > 1/2} (CORAL's rule)."""
    torch.manual_seed(1)
    outputs = torch.randn(500, 4) * 3
    outputs = outputs.sort(dim=1, descending=True).values  # ordered as the head makes them
    p = inference.class_probabilities(outputs, "ordinal")
    assert torch.equal(inference.decode_counts(p, "median"), (outputs > 0).sum(1))


def test_ordinal_loss_grows_with_the_distance_of_the_miss():
    outputs = torch.logit(torch.tensor([[0.99, 0.99, 0.01, 0.01]]))  # confidently "3"
    loss = {t: float(heads.count_loss(outputs, torch.tensor([t]), "ordinal")) for t in range(5)}
    assert loss[2] < 0.1
    assert loss[2] < loss[1] < loss[0] and loss[2] < loss[3] < loss[4]
    assert loss[0] == pytest.approx(2 * loss[1], rel=0.05)


def test_class_weights_balance_the_classes():
    weights = heads.balanced_weights([0] * 10 + [1] * 30 + [2] * 20 + [3] * 20 + [4] * 20, torch.device("cpu"))
    assert weights[0] == pytest.approx(2.0) and weights[1] == pytest.approx(2 / 3)
    outputs = torch.logit(torch.tensor([[0.9, 0.9, 0.1, 0.1]] * 2))  # both "3": the misses differ
    unweighted = heads.count_loss(outputs, torch.tensor([0, 1]), "ordinal")
    weighted = heads.count_loss(outputs, torch.tensor([0, 1]), "ordinal", weights)
    # Target 1 (weight 2) misses by 2, target 2 (weight 2/3) by 1: weighting raises the mean loss.
    assert torch.isfinite(weighted) and weighted > unweighted



def test_scores_by_hand():
    predicted, targets = torch.tensor([0, 1, 3, 4, 4]), torch.tensor([0, 2, 3, 4, 2])
    scored = heads.scores(predicted, targets)
    assert scored["accuracy"] == pytest.approx(3 / 5)
    assert scored["rmse"] == pytest.approx(math.sqrt((1 + 4) / 5))  # misses by 1 and 2 items
    first, second, *rest = scored["per_class"]
    assert first == 1.0 and math.isnan(second) and rest == [0.0, 1.0, 1.0]  # no photo of count 2: nan


@pytest.mark.parametrize("head", ["classify", "ordinal"])
def test_predict_fn_answers_count_probabilities_and_version(tmp_path, head):
    from PIL import Image

    torch.manual_seed(0)
    model = inference.build_model("resnet18", 5, head=head)
    model.eval()
    config = {"arch": "resnet18", "labels": [1, 2, 3, 4, 5], "image_size": 32, "head": head,
              "decode": "median" if head == "ordinal" else "argmax", "tta": "flips",
              "mean": list(inference.IMAGENET_MEAN), "std": list(inference.IMAGENET_STD), "model_id": "m-1"}
    loaded = {"model": model, "config": config, "device": torch.device("cpu")}
    rng = random.Random(0)
    images = [Image.new("RGB", (40, 30), tuple(rng.randrange(256) for _ in range(3))) for _ in range(3)]
    answers = inference.predict_fn(images, loaded)
    assert len(answers) == 3
    for answer in answers:
        assert set(answer) == {"count", "probabilities", "model_version"}
        assert answer["count"] in (1, 2, 3, 4, 5) and answer["model_version"] == "m-1"
        assert sum(answer["probabilities"].values()) == pytest.approx(1, abs=1e-5)
        assert list(answer["probabilities"]) == ["1", "2", "3", "4", "5"]
    single = inference.predict_fn(images[0], loaded)
    assert single == answers[0]
    json.dumps(single)


def test_tta_views_are_the_photo_its_flips_and_the_centre_and_corners_of_it_squashed_larger():
    """Serving's TTA (inference.tta_views) as benchmarks/real_finetune_cv.py measured it: the crops
    are model-sized windows of the photo squashed to image_size / 0.875, never resampled."""
    from PIL import Image

    image = Image.effect_noise((50, 37), 60).convert("RGB")  # not square: the squash is part of it
    config = {"image_size": 28, "mean": list(inference.IMAGENET_MEAN), "std": list(inference.IMAGENET_STD)}
    whole = inference.to_tensor(image, config)[None]
    larger = inference.to_tensor(image, {**config, "image_size": 32})[None]  # 28 / 0.875
    windows = [larger[..., t:t + 28, l:l + 28] for t, l in ((2, 2), (0, 0), (0, 4), (4, 0), (4, 4))]
    flips = [whole, whole.flip(-1), whole.flip(-2), whole.flip(-1).flip(-2)]
    for tta, expected in (("none", [whole]), ("flips", flips), ("crops", windows), ("flips+crops", flips + windows)):
        views = inference.tta_views([image], {**config, "tta": tta})
        assert len(views) == len(expected) and all(torch.equal(v, e) for v, e in zip(views, expected)), tta
    assert len(inference.tta_views([image], config)) == 1  # an artifact from before TTA
    with pytest.raises(ValueError, match="tta must be one of none, flips, crops, flips\\+crops, got 'mirror'"):
        inference.tta_views([image], {**config, "tta": "mirror"})


def test_an_artifact_with_an_unknown_tta_fails_to_load_naming_it(tmp_path):
    """At load, once (the endpoint does not start), not with a 5xx on every request."""
    import json

    model = inference.build_model("resnet18", 5, head="ordinal")
    torch.save(model.state_dict(), tmp_path / "model.pth")
    config = {"arch": "resnet18", "labels": [1, 2, 3, 4, 5], "image_size": 32, "head": "ordinal", "decode": "mean",
              "tta": "flips+crops", "mean": list(inference.IMAGENET_MEAN), "std": list(inference.IMAGENET_STD)}
    (tmp_path / "model_config.json").write_text(json.dumps(config))
    assert inference.model_fn(str(tmp_path))["config"]["tta"] == "flips+crops"
    (tmp_path / "model_config.json").write_text(json.dumps({**config, "tta": "rotations"}))
    with pytest.raises(inference.ModelLoadError, match="tta must be one of .*got 'rotations'"):
        inference.model_fn(str(tmp_path))


def test_predict_fn_averages_the_outputs_of_every_tta_view():
    from PIL import Image

    torch.manual_seed(0)
    model = inference.build_model("resnet18", 5, head="ordinal")
    model.eval()
    config = {"arch": "resnet18", "labels": [1, 2, 3, 4, 5], "image_size": 32, "head": "ordinal", "decode": "mean",
              "tta": "flips+crops", "mean": list(inference.IMAGENET_MEAN), "std": list(inference.IMAGENET_STD)}
    images = [Image.effect_noise((45, 33), 50 + 20 * i).convert("RGB") for i in range(2)]
    answers = inference.predict_fn(images, {"model": model, "config": config, "device": torch.device("cpu")})
    with torch.no_grad():
        outputs = torch.stack([model(v) for v in inference.tta_views(images, config)]).mean(0)
        expected = inference.class_probabilities(outputs, "ordinal")
    for answer, row in zip(answers, expected):
        assert [answer["probabilities"][str(c)] for c in range(1, 6)] == pytest.approx(row.tolist(), abs=1e-5)
    with torch.no_grad():
        alone = inference.class_probabilities(model(inference.tta_views(images, {**config, "tta": "none"})[0]), "ordinal")
    assert not torch.allclose(alone, expected, atol=1e-3)  # the views did change the answer


def test_mixup_pairs_each_input_with_another_of_the_batch_and_mixes_their_targets():
    """--mixup: a share from Beta(a, a) and a permutation of the batch; the two losses weighted by
    the share equal the ordinal loss against the mixed targets (what the mixed input shows)."""
    from trainer.epoch import mixup_partners
    cpu = torch.device("cpu")
    assert mixup_partners(8, 0.0, cpu) == (1.0, None)
    assert mixup_partners(1, 0.2, cpu) == (1.0, None)  # a batch of one has no partner
    torch.manual_seed(0)
    share, partner = mixup_partners(8, 0.2, cpu)
    assert 0.0 < share < 1.0 and sorted(partner.tolist()) == list(range(8))
    logits, targets = torch.randn(8, 4), torch.tensor([0, 1, 2, 3, 4, 0, 4, 2])
    mixed = share * heads.count_loss(logits, targets, "ordinal") + (1 - share) * heads.count_loss(
        logits, targets[partner], "ordinal")
    above = lambda t: (t[:, None] > torch.arange(4)[None, :]).float()  # noqa: E731
    soft = share * above(targets) + (1 - share) * above(targets[partner])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, soft, reduction="none").sum(1).mean()
    assert mixed.item() == pytest.approx(expected.item(), rel=1e-5)
