"""The step scripts' modules that need no torch, through their public functions.

They run in the SageMaker images' Pythons too (3.12, 3.13: tests/test_image_pythons.py runs this file
there, beside test_rules.py, test_preprocess.py and test_ingest.py), so they import nothing but the
scripts and what a step container installs: numpy, Pillow, matplotlib, no torch, no project code.

- photos.py (Preprocess, Evaluate and serving decode every photo through it): the parts without
  torch; tests/test_photos.py holds the whole rule but imports inference.py, which needs torch.
- debugger.py without smdebug, as every Train job runs unless EnableDebugger=true.
- evaluate.py's rule verdicts, from the Debugger's data or from history.json's per-epoch losses.
"""
from __future__ import annotations

import importlib
import importlib.util
import io
import json
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from conftest import import_script

photos = import_script("inference", "photos")
rules = import_script("evaluate", "rules")
evaluate = import_script("evaluate", "evaluate")


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def photo(width: int = 48, height: int = 32) -> Image.Image:
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[: height // 4, : width // 4] = (0, 0, 255)  # a blue block in the top-left corner
    return Image.fromarray(pixels, "RGB")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


# --------------------------------------------------------------------------- photos.py


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_a_photo_decodes_upright_in_rgb(fmt):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    image = photos.decode(encode(photo(), fmt, exif=exif.tobytes()))
    assert image.mode == "RGB" and image.size == (32, 48)
    pixels = np.asarray(image)
    assert pixels[2, -3, 2] > 200 and pixels[2, 2, 2] < 100  # the block is top-right once turned


def test_a_png_declaring_40_megapixels_is_refused_from_its_header():
    header = struct.pack(">IIBBBBB", 6324, 6324, 8, 6, 0, 0, 0)
    bomb = (photos.PNG_SIGNATURE + png_chunk(b"IHDR", header)
            + png_chunk(b"IDAT", zlib.compress(b"\x00" * (6324 * 4 + 1), 9)) + png_chunk(b"IEND", b""))
    started = time.perf_counter()
    with pytest.raises(photos.ImageRejected) as caught:
        photos.decode(bomb)
    assert time.perf_counter() - started < 0.2
    assert caught.value.kind == "too_large" and "6324x6324" in caught.value.reason


def test_truncated_and_foreign_bytes_are_refused_by_kind():
    jpeg = encode(photo(200, 200), "JPEG", quality=95)
    with pytest.raises(photos.ImageRejected) as caught:
        photos.decode(jpeg[: len(jpeg) // 2])
    assert caught.value.kind in ("truncated", "corrupt")
    with pytest.raises(photos.ImageRejected) as caught:
        photos.decode(encode(photo(), "GIF"))
    assert caught.value.kind == "wrong_format"
    with pytest.raises(photos.ImageRejected) as caught:
        photos.decode(b"")
    assert caught.value.kind == "empty"


# --------------------------------------------------------------------------- debugger.py


@pytest.fixture
def debugger(monkeypatch, tmp_path):
    """debugger.py fresh (its state is per process), in a job without SageMaker's hook config."""
    if importlib.util.find_spec("smdebug") is not None:
        pytest.skip("smdebug is installed in this environment: these are the runs without it")
    module = importlib.reload(import_script("train", "debugger"))
    monkeypatch.setattr(module, "SMDEBUG_CONFIG", tmp_path / "no-hook-config.json")
    return module


def test_without_smdebug_nothing_is_recorded_and_debugger_json_says_why(debugger, tmp_path, capsys):
    assert debugger.attach(object(), rank=0) is None
    debugger.record("train", object())  # train.py calls these every step: no-ops
    debugger.learning_rate(0.1)
    debugger.pause()
    summary = debugger.finish(tmp_path / "model")
    assert summary == {"status": "missing", "reason": debugger.NOT_INSTALLED}
    assert json.loads((tmp_path / "model" / "debugger.json").read_text()) == summary
    out = capsys.readouterr().out
    assert out.splitlines() == [f"debugger: off: {debugger.NOT_INSTALLED}",
                                f"debugger: missing ({debugger.NOT_INSTALLED})"]


def test_a_job_with_the_debugger_hook_config_but_no_smdebug_says_the_rules_will_see_nothing(
        debugger, tmp_path, capsys):
    config = tmp_path / "debughookconfig.json"
    config.write_text("{}")
    debugger.SMDEBUG_CONFIG = config
    assert debugger.attach(object()) is None
    assert "has SageMaker's DebugHookConfig" in capsys.readouterr().out


def test_other_ranks_never_record(debugger, tmp_path):
    assert debugger.attach(object(), rank=1) is None
    assert debugger.finish(tmp_path / "model") == {} and not (tmp_path / "model").exists()


# --------------------------------------------------------------------------- evaluate.py's rules


def epochs(train_losses, validation_losses) -> dict:
    return {"epochs": [{"epoch": i + 1, "train": {"loss": t}, "validation": {"loss": v}}
                       for i, (t, v) in enumerate(zip(train_losses, validation_losses))]}


def test_the_four_verdicts_come_from_the_per_epoch_losses_without_the_debugger():
    """The default on both back-ends (train's requirements.txt has no smdebug)."""
    history = epochs([1.6 - 0.05 * i for i in range(12)], [1.5 - 0.05 * i for i in range(12)])
    verdicts, note = evaluate.rule_verdicts(history, {"status": "missing", "reason": "smdebug is not installed"})
    found = {v["rule"]: v["status"] for v in verdicts}
    assert list(found) == list(rules.RULES)
    assert found == {"LossNotDecreasing": rules.NO_ISSUES, "Overfit": rules.NO_ISSUES,
                     "VanishingGradient": rules.NO_DATA, "ExplodingTensor": rules.NO_ISSUES}
    assert note.startswith("Debugger data missing (smdebug is not installed)")
    # A validation loss that runs away from the training loss is found from the same per-epoch record.
    overfit = epochs([1.0 - 0.05 * i for i in range(6)], [1.0 + 0.2 * i for i in range(6)])
    assert {v["rule"]: v["status"] for v in evaluate.rule_verdicts(overfit, None)[0]}["Overfit"] == rules.ISSUES


def test_the_debuggers_data_is_used_when_the_job_recorded_it():
    recorded = {"status": "recorded", "smdebug": "1.0.34",
                "losses": {"train": [[s, 2.0 - 0.01 * s] for s in range(0, 60, 2)],
                           "validation": [[s, 2.0 - 0.01 * s] for s in range(1, 60, 10)]},
                "gradients": {"gradient/fc.weight": [[0, 1e-9], [50, 1e-9]]},
                "tensors": {"fc.weight": [[0, [0.0]], [50, [float("nan")]]]}}
    verdicts, note = evaluate.rule_verdicts(epochs([1.0], [1.0]), recorded)
    found = {v["rule"]: v["status"] for v in verdicts}
    assert found["VanishingGradient"] == found["ExplodingTensor"] == rules.ISSUES
    assert note.startswith("Debugger data recorded by smdebug 1.0.34: 30 training loss steps, 1 gradient tensors")
