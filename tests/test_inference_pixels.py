"""What the model sees, computed without torchvision: the same pixels and floats as torchvision's
functions, and an EfficientNet artifact served without importing it (about 1.3 s of CPU per process)."""
from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
import torch
import torchvision
from PIL import Image
from torchvision.transforms.v2 import functional as F

from conftest import import_script, make_artifact
from serving_testing import bin_photo

inference = import_script("inference", "inference")


def test_the_resnets_are_torchvisions():
    assert inference.RESNETS == tuple(sorted(m for m in torchvision.models.list_models(module=torchvision.models)
                                            if "resne" in m))


@pytest.mark.parametrize("size, arch", [(32, "resnet18"), (224, "efficientnet_lite0"), (97, "resnet18")])
def test_pixels_and_normalisation_are_torchvisions_to_the_bit(size, arch):
    mean, std = inference.normalization(arch)
    config = {"image_size": size, "mean": list(mean), "std": list(std)}
    for seed in range(4):
        image = Image.open(io.BytesIO(bin_photo(seed))).convert("RGB")
        pixels = inference.to_pixels(image, config)
        expected = F.pil_to_tensor(image.resize((size, size), Image.BILINEAR))
        assert pixels.dtype == torch.uint8 and torch.equal(pixels, expected)
        batch = torch.stack([pixels, pixels.flip(-1)])
        floats = F.to_dtype(batch, torch.float32, scale=True)  # as augmentation hands them on
        for tensor in (pixels, batch, floats, floats.double()):  # CHW and NCHW, uint8 and float
            before = tensor.clone()
            ours = inference.normalize(tensor, config)
            theirs = F.normalize(F.to_dtype(tensor, torch.float32, scale=True), list(mean), list(std))
            assert ours.dtype == torch.float32 and torch.equal(ours, theirs)
            assert torch.equal(tensor, before)  # never normalised in place


def test_an_efficientnet_artifact_loads_and_answers_without_torchvision(tmp_path):
    make_artifact(tmp_path, arch="efficientnet_lite0", image_size=64)
    (tmp_path / "photo.jpg").write_bytes(bin_photo(3))
    code = f"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("served", {str(tmp_path / "model" / "code" / "inference.py")!r})
served = importlib.util.module_from_spec(spec); spec.loader.exec_module(served)
model = served.model_fn({str(tmp_path / "model")!r})
answer = served.predict_fn(served.input_fn(open({str(tmp_path / "photo.jpg")!r}, "rb").read(), "image/jpeg"), model)
print(json.dumps([answer["count"], "torchvision" in sys.modules]))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    count, imported = json.loads(done.stdout.splitlines()[-1])
    assert count in (1, 2, 3, 4, 5) and imported is False
