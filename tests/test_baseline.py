"""The monitor's reference: the embedding (inference.predict_and_embed), the image statistics
(photos.statistics) and baseline.json, which Evaluate writes beside evaluation.json.

Real networks (ResNet-18, EfficientNet-Lite0 with two tails and flip TTA), real photos through
the real decoder, evaluate.py run as its container runs it.
"""
from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from conftest import ROOT, import_script, make_artifact
from in_process import run_main

inference = import_script("inference", "inference")
photos = import_script("inference", "photos")
baseline_module = import_script("evaluate", "baseline")
evaluate = import_script("evaluate", "evaluate")

EVALUATE = ROOT / "scripts" / "evaluate" / "evaluate.py"


def noise_photo(seed: int, size=(120, 90)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def served(arch: str, image_size: int, **config) -> dict:
    """A model dict as model_fn returns it, random weights: the embedding needs no training."""
    torch.manual_seed(0)
    network = inference.build_model(arch, 5, head=config.get("head", "classify"), image_size=image_size,
                                    tails=config.get("tails", 1), shared_blocks=config.get("shared_blocks", 0))
    mean, std = inference.normalization(arch)
    full = {"arch": arch, "labels": [1, 2, 3, 4, 5], "image_size": image_size, "mean": list(mean),
            "std": list(std), "model_id": f"{arch}-test", **config}
    return {"model": network.eval(), "config": full, "device": torch.device("cpu"), "cuts": None}


# --------------------------------------------------------------------------- the embedding


def test_resnet_embedding_is_the_pooled_features_and_the_answer_is_unchanged():
    model = served("resnet18", 64)
    images = [noise_photo(i) for i in range(3)]
    predictions, embeddings = inference.predict_and_embed(images, model)
    assert predictions == inference.predict_fn(images, model)
    assert inference.output_fn(predictions) == inference.output_fn(inference.predict_fn(images, model))
    net = model["model"]
    batch = torch.stack([inference.to_tensor(image, model["config"]) for image in images])
    with torch.no_grad():
        x = batch
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool"):
            x = getattr(net, name)(x)
    assert embeddings.shape == (3, 512) and embeddings.dtype == np.float32
    np.testing.assert_allclose(embeddings, x.flatten(1).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(inference.embed_fn(images, model), embeddings)


def test_efficientnet_embedding_is_the_pooled_features():
    pytest.importorskip("efficientnet_lite_pytorch")
    model = served("efficientnet_lite0", 64)
    images = [noise_photo(i) for i in range(2)]
    predictions, embeddings = inference.predict_and_embed(images, model)
    assert predictions == inference.predict_fn(images, model)
    batch = torch.stack([inference.to_tensor(image, model["config"]) for image in images])
    with torch.no_grad():
        features = model["model"]._avg_pooling(model["model"].extract_features(batch)).flatten(1)
    assert embeddings.shape == (2, 1280)
    np.testing.assert_allclose(embeddings, features.numpy(), rtol=1e-4, atol=1e-5)


def test_tails_with_flip_tta_embed_side_by_side_and_flip_invariant():
    """The finetune/real profiles' networks: each tail's features, averaged over the four
    flipped views as the answer is, so a flipped photo has the same embedding."""
    pytest.importorskip("efficientnet_lite_pytorch")
    model = served("efficientnet_lite0", 64, head="ordinal", tails=2, shared_blocks=4, tta="flips")
    image = noise_photo(7, (64, 64))
    predictions, embeddings = inference.predict_and_embed([image, image.transpose(Image.FLIP_LEFT_RIGHT)], model)
    assert predictions == inference.predict_fn([image, image.transpose(Image.FLIP_LEFT_RIGHT)], model)
    assert embeddings.shape == (2, 2 * 1280)
    np.testing.assert_allclose(embeddings[0], embeddings[1], rtol=1e-4, atol=1e-5)
    assert not np.allclose(embeddings[0, :1280], embeddings[0, 1280:])  # two tails, two views
    # No hook is left behind: a later plain predict_fn records nothing.
    assert all(not head._forward_pre_hooks for head in inference.heads(model["model"]))


# --------------------------------------------------------------------------- image statistics


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def test_statistics_measure_light_contrast_and_sharpness():
    grey = photos.statistics(Image.new("RGB", (80, 60), (102, 102, 102)), 32)
    assert grey == {"brightness": 0.4, "contrast": 0.0, "sharpness": 0.0, "width": 80, "height": 60}
    checker = np.indices((64, 64)).sum(0) // 4 % 2 * 255
    sharp = Image.fromarray(np.repeat(checker[..., None], 3, 2).astype(np.uint8))
    s = photos.statistics(sharp, 64)
    assert s["brightness"] == pytest.approx(0.5, abs=0.01) and s["contrast"] == pytest.approx(0.5, abs=0.01)
    blurred = photos.statistics(sharp.filter(ImageFilter.GaussianBlur(2)), 64)
    assert blurred["sharpness"] < s["sharpness"] / 5
    darker = photos.statistics(Image.eval(sharp, lambda v: v // 3), 64)
    assert darker["brightness"] == pytest.approx(s["brightness"] / 3, abs=0.01)


def test_statistics_are_those_of_the_decoded_upright_photo_at_the_models_side(bin_photos):
    path = sorted((bin_photos / "3").glob("*.jpg"))[0]
    decoded = photos.decode(path.read_bytes())
    stats = photos.statistics(decoded, 96)
    assert (stats["width"], stats["height"]) == decoded.size
    # Resized early, as the local endpoint does: the same numbers (it keeps the photo's own size).
    early = decoded.resize((96, 96), Image.BILINEAR)
    assert photos.statistics(early, 96) == stats
    # A photo turned by its EXIF orientation reports its upright size.
    exif = Image.Exif()
    exif[0x0112] = 6
    turned = photos.decode(encode(Image.open(path), "JPEG", quality=95, exif=exif.tobytes()))
    assert photos.statistics(turned, 96)["width"] == decoded.size[1]


# --------------------------------------------------------------------------- baseline.json


@pytest.fixture(scope="module")
def test_split(tmp_path_factory, bin_photos) -> Path:
    split = tmp_path_factory.mktemp("baseline-split")
    for count in range(1, 6):
        (split / str(count)).mkdir()
        for photo in sorted((bin_photos / str(count)).glob("*.jpg"))[:6]:
            shutil.copy(photo, split / str(count) / photo.name)
    return split


def run_evaluate(model: Path, split: Path, out: Path) -> subprocess.CompletedProcess:
    """Evaluate's main() in this process (tests/test_report.py runs the script as its container does)."""
    return run_main(evaluate.main, "--model", model, "--test", split, "--output", out, "--corruptions", "none",
                    "--batch-size", "7", check=True)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, test_split):
    root = tmp_path_factory.mktemp("baseline-eval")
    artifact = make_artifact(root, seed=3, image_size=64, model_id="baseline-model")
    result = run_evaluate(artifact, test_split, root / "out")
    return root, artifact, json.loads((root / "out" / "baseline.json").read_text()), result.stdout


@pytest.mark.slow
def test_evaluate_writes_the_baseline_beside_evaluation_json(evaluated, test_split):
    root, artifact, baseline, stdout = evaluated
    evaluation = json.loads((root / "out" / "evaluation.json").read_text())
    assert baseline["model"] == {"model_id": "baseline-model", "artifact_sha256": evaluation["artifact"]["sha256"]}
    assert baseline["made"]["photos"] == evaluation["test_images"] == 30
    # Without Preprocess's statistics of the photos as received, the test split's own, and a note.
    assert [n for n in baseline["notes"] if "test split's photos alone" in n] == baseline["notes"] != []
    assert baseline["image_statistics"]["from"] == "the test split"
    with open(root / "out" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    predicted = [int(r["prediction"]) for r in rows]
    assert baseline["predicted_counts"] == {str(c): predicted.count(c) for c in range(1, 6)}
    assert "wrote" in stdout and "baseline.json: 30 photos, embeddings 1280-d" in stdout

    # The image statistics: those of each scored photo, decoded by the serving rule, in order.
    stats = baseline["image_statistics"]
    assert stats["side"] == 64 and stats["names"] == list(photos.STATISTICS)
    expected = [photos.statistics(photos.decode((test_split / r["path"]).read_bytes()), 64) for r in rows]
    for name in photos.STATISTICS:
        assert stats["values"][name] == [e[name] for e in expected]

    # The embeddings: the served model's, projected by the stored PCA.
    model_dir = root / "model"
    model = inference.model_fn(str(model_dir))
    images = [inference.input_fn((test_split / r["path"]).read_bytes(), "image/jpeg") for r in rows]
    _, embeddings = inference.predict_and_embed(images, model)
    summary = baseline["embeddings"]
    assert summary["dimension"] == 1280 and summary["sample_size"] == 15
    # Half the photos are the reference, the other half fitted the PCA: never the same photos.
    reference = summary["sample_index"]
    fit = sorted(set(range(30)) - set(reference))
    assert len(reference) == 15 and summary["projection"]["fitted_on"] == 15
    mean = baseline_module.decode_array(summary["projection"]["mean"])
    directions = baseline_module.decode_array(summary["projection"]["directions"])
    assert directions.shape == (14, 1280)  # at most one fewer than the photos it is fitted on
    np.testing.assert_allclose(directions @ directions.T, np.eye(len(directions)), atol=1e-4)
    np.testing.assert_allclose(mean, embeddings[fit].mean(0), rtol=1e-4, atol=1e-5)
    projected = (embeddings - mean) @ directions.T
    np.testing.assert_allclose(baseline_module.decode_array(summary["sample"]), projected[reference], atol=1e-3)
    np.testing.assert_allclose(summary["mean"], projected.mean(0), atol=1e-4)


@pytest.mark.slow
def test_the_image_statistics_are_of_every_photo_as_received_not_the_resized_copies(tmp_path, bin_photos):
    """Preprocess measures every accepted photo as sent (--statistics-side: the model's side) and
    Evaluate's baseline takes those: a served photo has its camera's size and sharpness, not
    those of the copy resized for training."""
    source = tmp_path / "photos"
    for count in range(1, 6):
        (source / str(count)).mkdir(parents=True)
        for photo in sorted((bin_photos / str(count)).glob("*.jpg"))[:5]:
            shutil.copy(photo, source / str(count) / photo.name)
    preprocess = ROOT / "scripts" / "preprocess" / "preprocess.py"
    subprocess.run([sys.executable, str(preprocess), "--input", str(source), "--output", str(tmp_path / "data"),
                    "--manifest", "", "--resize", "48", "--statistics-side", "64", "--workers", "1"],
                   check=True, capture_output=True, timeout=300)
    artifact = make_artifact(tmp_path / "model", seed=3, image_size=64, model_id="baseline-model")
    run_main(evaluate.main, "--model", artifact, "--test", tmp_path / "data" / "test",
             "--data-report", tmp_path / "data" / "report", "--output", tmp_path / "out", "--corruptions", "none",
             check=True)
    baseline = json.loads((tmp_path / "out" / "baseline.json").read_text())
    stats = baseline["image_statistics"]
    originals = sorted(source.glob("*/*.jpg"))
    assert stats["photos"] == len(originals) > baseline["made"]["photos"]  # every split, not the test split
    assert stats["from"].startswith("every photo Preprocess accepted, as received")
    assert not any("photos alone" in note for note in baseline["notes"])
    expected = [photos.statistics(photos.decode(p.read_bytes()), 64) for p in originals]
    for name in photos.STATISTICS:
        assert sorted(stats["values"][name]) == sorted(e[name] for e in expected), name
    assert min(stats["values"]["width"]) > 48 and min(stats["values"]["height"]) > 48  # not the 48 px copies

    # Measured at another side than the model's: not comparable, so the test split's, with why.
    run_main(evaluate.main, "--model", make_artifact(tmp_path / "other", seed=3, image_size=32),
             "--test", tmp_path / "data" / "test", "--data-report", tmp_path / "data" / "report",
             "--output", tmp_path / "out32", "--corruptions", "none", check=True)
    other = json.loads((tmp_path / "out32" / "baseline.json").read_text())
    assert other["image_statistics"]["from"] == "the test split"
    assert any("at 64 px, the model sees 32 px" in note for note in other["notes"])


@pytest.mark.slow
def test_the_baseline_does_not_depend_on_the_batch_size(evaluated, test_split, tmp_path):
    root, artifact, baseline, _ = evaluated
    run_main(evaluate.main, "--model", artifact, "--test", test_split, "--output", tmp_path,
             "--corruptions", "none", "--batch-size", "32", check=True)
    again = json.loads((tmp_path / "baseline.json").read_text())
    assert again["predicted_counts"] == baseline["predicted_counts"]
    assert again["image_statistics"] == baseline["image_statistics"]
    a = baseline_module.decode_array(again["embeddings"]["sample"])
    b = baseline_module.decode_array(baseline["embeddings"]["sample"])
    np.testing.assert_allclose(a, b, atol=1e-3)


@pytest.mark.slow
def test_an_artifact_without_the_embedding_code_gets_a_baseline_that_says_so(tmp_path, test_split):
    """An artifact trained before predict_and_embed and photos.statistics existed."""
    artifact = make_artifact(tmp_path, seed=3, image_size=32)
    code = tmp_path / "model" / "code"
    for name, function in (("inference.py", "predict_and_embed"), ("photos.py", "statistics")):
        text = (code / name).read_text()
        (code / name).write_text(text.replace(f"def {function}(", f"def _removed_{function}("))
    from pipeline.local.jobs import tar_model

    tar_model(tmp_path / "model", tmp_path / "model.tar.gz")
    # In a process of its own, as the job runs: this process imported the current code/ modules
    # (photos.py, inference.py) for the other artifacts already.
    done = subprocess.run([sys.executable, str(EVALUATE), "--model", str(tmp_path / "model.tar.gz"), "--test",
                           str(test_split), "--output", str(tmp_path / "out"), "--corruptions", "none"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    baseline = json.loads((tmp_path / "out" / "baseline.json").read_text())
    assert baseline["embeddings"] is None and baseline["image_statistics"] is None
    assert sum(baseline["predicted_counts"].values()) == 30
    assert any("predict_and_embed" in note for note in baseline["notes"])
    assert any("statistics()" in note for note in baseline["notes"])
