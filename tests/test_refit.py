"""train.py --refit (pipeline parameter Refit): with --tails N the validation photos are dealt into N
seeded parts, stratified by count; tail k trains on the training split and every part but part k
and predicts part k, so each validation photo is answered by the one tail that never trained on
it, and the validation metrics and the recall floor's cuts are those answers. The test split is
never trained on."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT
from pipeline.dag.parameters import check_combination
from pipeline.dag.profiles import defaults
from test_partial_finetune import ARGS
from test_train import run_train, write_split
from trainer import refit
from trainer.args import parse_args


def photos(per_count: dict[int, int]) -> list[tuple[Path, int]]:
    """(path, class index) as trainer.data lists a channel: `<count>/<id>.jpg`."""
    return [(Path(f"/v/{count}/photo-{count}-{i:03d}.jpg"), count - 1)
            for count, n in per_count.items() for i in range(n)]


@pytest.mark.parametrize("parts", [2, 3])
def test_the_parts_are_stratified_deterministic_and_seeded(parts):
    samples = photos({1: 7, 2: 12, 3: 13, 4: 11, 5: 6})
    dealt = refit.validation_parts(samples, parts, seed=42)
    assert sorted(set(dealt)) == list(range(parts))
    sizes = Counter(dealt)
    assert max(sizes.values()) - min(sizes.values()) <= 1
    for index in range(5):  # each count split as evenly as it can be
        per_part = Counter(p for p, (_, c) in zip(dealt, samples) if c == index)
        assert max(per_part.values()) - min(per_part.get(k, 0) for k in range(parts)) <= 1

    by_id = {path.stem: part for (path, _), part in zip(samples, dealt)}
    shuffled = samples[:]
    random.Random(0).shuffle(shuffled)  # the listing order does not matter, only the photos and the seed
    assert {p.stem: part for (p, _), part in zip(shuffled, refit.validation_parts(shuffled, parts, 42))} == by_id
    assert refit.validation_parts(samples, parts, 42) == dealt
    other = refit.validation_parts(samples, parts, 43)
    assert other != dealt and Counter(other) == sizes


def test_a_validation_split_smaller_than_the_tails_is_refused_by_name():
    """Every tail needs a part to answer: 2 validation photos cannot be dealt to 3 tails."""
    two = photos({1: 1, 4: 1})
    assert sorted(refit.validation_parts(two, 2, seed=42)) == [0, 1]
    with pytest.raises(refit.TrainError, match=r"needs at least 3 validation photos; it has 2"):
        refit.validation_parts(two, 3, seed=42)


def test_out_of_fold_puts_each_answer_back_on_its_photo():
    """Each tail's kept outputs are on its own part, in the order its ranks scored them; the
    stitched answers are in the validation split's order and scored as evaluate scores them."""
    parts = [0, 1, 1, 0, 2, 2, 1, 0]
    targets = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    truth = torch.softmax(torch.randn(len(parts), 5), 1)
    for world in (1, 2):
        members = []
        for k in range(3):
            held = [i for i, p in enumerate(parts) if p == k]
            order = [i for rank in range(world) for i in held[rank::world]]  # gathered: rank after rank
            members.append({"best": {"outputs": (truth[order], targets[order])}})
        scored = refit.out_of_fold(members, parts, SimpleNamespace(world=world), "mean")
        probabilities, stitched = scored["outputs"]
        assert torch.equal(stitched, targets) and torch.allclose(probabilities, truth)
        assert scored["images"] == len(parts)
        assert scored["loss"] == pytest.approx(float(-truth[range(len(parts)), targets].log().mean()), rel=1e-5)


def test_refit_needs_two_tails():
    with pytest.raises(SystemExit):
        parse_args([*ARGS, "--refit", "true"])
    assert parse_args([*ARGS, "--tails", "2"]).refit is False  # off unless asked for
    assert parse_args([*ARGS, "--tails", "2", "--refit", "true"]).refit is True
    values = {**defaults("real"), "Refit": "true", "Tails": 1}
    with pytest.raises(ValueError, match="Refit=true needs Tails of 2 or more"):
        check_combination(values)
    check_combination({**values, "Tails": 2})
    assert defaults("real")["Refit"] == "true" and defaults("real")["Tails"] == 3
    assert defaults("local")["Refit"] == "false" and defaults("full")["Refit"] == "false"


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> dict[str, Path]:
    """Squares photos split by Preprocess itself into train, validation and test (60/20/20)."""
    root = tmp_path_factory.mktemp("refit")
    write_split(root / "photos", 10, seed=5)
    (root / "photos" / "manifest.csv").unlink()
    subprocess.run([sys.executable, str(ROOT / "scripts" / "preprocess" / "preprocess.py"), "--input",
                    str(root / "photos"), "--output", str(root / "data"), "--manifest", "", "--resize", "64",
                    "--workers", "1"], check=True, capture_output=True, timeout=300)
    return {name: root / "data" / name for name in ("train", "validation", "test")}


def ids(folder: Path) -> set[str]:
    return {p.stem for p in folder.glob("*/*.jpg")}


@pytest.mark.slow
def test_refit_trains_each_tail_beside_its_part_and_never_on_the_test_split(tmp_path, split):
    train, validation, test = (ids(split[name]) for name in ("train", "validation", "test"))
    assert train and validation and test and not (train | validation) & test
    done = run_train(tmp_path, split, *ARGS, "--epochs", "2", "--tails", "2", "--refit", "true",
                     "--recall_floor", "0.2", env={"INVMON_FEATURE_CACHE": str(tmp_path / "cache")})
    lines = done.stdout.splitlines()
    model_dir = tmp_path / "model"
    history = json.loads((model_dir / "history.json").read_text())
    record = history["refit"]
    assert record["parts"] == 2 and [t["member"] for t in record["tails"]] == [0, 1]
    predicted = [set(t["predicted"]) for t in record["tails"]]
    assert predicted[0] | predicted[1] == validation and not predicted[0] & predicted[1]  # each photo once
    for k, tail in enumerate(record["tails"]):
        trained = tail["trained_on"]
        assert len(trained) == len(set(trained))
        assert set(trained) == train | (validation - predicted[k])  # every photo it may learn from
        assert not set(trained) & predicted[k]  # and none it answers for
        assert not set(trained) & test
        assert (f"refit: tail {k + 1} of 2 trains on {len(train)} training and {len(validation - predicted[k])} "
                f"validation photos (every part but part {k + 1}) and predicts part {k + 1} "
                f"({len(predicted[k])} photos)") in lines
    # The parts are the seeded, stratified deal of the validation photos.
    listed = [(p, int(p.parent.name) - 1) for p in sorted(split["validation"].glob("*/*.jpg"))]
    dealt = refit.validation_parts(listed, 2, 42)
    assert predicted[0] == {p.stem for (p, _), part in zip(listed, dealt) if part == 0}

    # Each tail scored its own part; the validation metrics are the out-of-fold answers, all of them,
    # and the cuts were fitted on them.
    assert sum(line.startswith("epoch=") for line in lines) == 2
    assert sum(line.startswith("tail 2| epoch=") for line in lines) == 2
    (combined,) = [line for line in lines if line.startswith("tails: 2 refit, out of fold validation:accuracy=")]
    config = json.loads((model_dir / "model_config.json").read_text())
    assert config["validation"]["images"] == len(validation)
    assert any(line.startswith("recall floor 0.2: cuts") for line in lines)
    assert lines.index(combined) < [i for i, line in enumerate(lines) if line.startswith("recall floor")][0]
    assert config["refit"] == {"parts": 2, "seed": 42, "trained_on": [len(t["trained_on"]) for t in record["tails"]],
                               "predicted": [len(p) for p in predicted], "validation": "out of fold"}
    assert config["hyperparameters"]["refit"] is True
    assert config["tails"] == 2 and "cuts" in config  # served as the mean of the tails, with the cuts


@pytest.mark.slow
def test_without_refit_the_tails_learn_from_the_training_split_alone(tmp_path, split):
    done = run_train(tmp_path, split, *ARGS, "--epochs", "1", "--tails", "2",
                     env={"INVMON_FEATURE_CACHE": str(tmp_path / "cache")})
    assert "refit: tail" not in done.stdout and "refit, out of fold" not in done.stdout
    assert any(line.startswith("tails: 2 averaged, validation:accuracy=") for line in done.stdout.splitlines())
    config = json.loads((tmp_path / "model" / "model_config.json").read_text())
    history = json.loads((tmp_path / "model" / "history.json").read_text())
    assert "refit" not in config and "refit" not in history
    assert config["hyperparameters"]["refit"] is False
    assert config["train_images"] == len(ids(split["train"]))
    assert config["validation"]["images"] == len(ids(split["validation"]))


@pytest.mark.slow
def test_a_restarted_refit_resumes_each_tail_and_a_run_without_it_does_not(tmp_path, split):
    env = {"INVMON_FEATURE_CACHE": str(tmp_path / "cache")}
    args = [*ARGS, "--epochs", "1", "--tails", "2", "--refit", "true", "--checkpoint_dir", str(tmp_path / "ckpt")]
    run_train(tmp_path / "first", split, *args, env=env)
    again = run_train(tmp_path / "again", split, *args, env=env)
    assert "checkpoint already holds all 1 epochs of tail 1" in again.stdout
    assert "tail 2| checkpoint already holds all 1 epochs of tail 2" in again.stdout
    first, repeated = (json.loads((tmp_path / run / "model" / "model_config.json").read_text())
                       for run in ("first", "again"))
    assert repeated["weights_sha256"] == first["weights_sha256"] and repeated["validation"] == first["validation"]

    # The same checkpoints hold tails that learnt from validation photos: a job without refit starts over.
    plain = [a for a in args if a not in ("--refit", "true")]
    off = run_train(tmp_path / "off", split, *plain, env=env)
    assert "belongs to another configuration (refit, train_images differ)" in off.stdout
    assert "epoch=1/1" in off.stdout
