"""Serving code of the bin-count model: the SageMaker PyTorch serving functions.

This file travels inside every model artifact as `code/inference.py`. The SageMaker endpoint,
the local endpoint (pipeline/endpoint.py) and the Evaluate step all load the model through
these four functions, so what Evaluate measures is what the endpoint serves.

Artifact layout (model.tar.gz):
    model.pth            state_dict, loadable with torch.load(..., weights_only=True)
    model_config.json    arch, labels, image settings, model id, training summary
    code/inference.py    this file
    code/photos.py       the one image-decoding rule (shared with Preprocess and Evaluate)
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from types import ModuleType

import torch
import torchvision
from PIL import Image
from torchvision.transforms.v2 import functional as F


def _sibling(name: str) -> ModuleType:
    """Import code/<name>.py from beside this file under a name tied to this module, so that two
    artifacts loaded into one process (the local endpoint, Evaluate, tests) never share it."""
    unique = f"{__name__}__{name}"
    if unique not in sys.modules:
        spec = importlib.util.spec_from_file_location(unique, Path(__file__).with_name(f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[unique] = module
        spec.loader.exec_module(module)
    return sys.modules[unique]


photos = _sibling("photos")
CONTENT_TYPES = tuple(photos.CONTENT_TYPE_FORMATS)
JSON = "application/json"
MAX_PIXELS = photos.MAX_PIXELS
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESNETS = tuple(m for m in torchvision.models.list_models(module=torchvision.models) if "resne" in m)


class InvalidInput(ValueError):
    """The request itself is wrong (content type, bytes that are not an image): a 4xx."""


def build_model(arch: str, num_classes: int) -> torch.nn.Module:
    """A torchvision ResNet with a `num_classes` head and no downloaded weights."""
    if arch not in RESNETS:
        raise ValueError(f"arch must be a torchvision ResNet ({', '.join(RESNETS)}), got {arch!r}")
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)


def to_pixels(image: Image.Image, config: dict) -> torch.Tensor:
    """PIL image -> uint8 CHW tensor of the whole photo resized to an image_size square.

    No crop: cutting the edges of a bin photo can cut items out of it and change the count.
    Training caches these pixels and augments them before `normalize`, so a training image
    and a served image go through the same resize.
    """
    size = int(config["image_size"])
    return F.pil_to_tensor(image.convert("RGB").resize((size, size), Image.BILINEAR))


def normalize(pixels: torch.Tensor, config: dict) -> torch.Tensor:
    """uint8 pixels (CHW or NCHW) -> float tensor normalised with the artifact's mean and std."""
    tensor = F.to_dtype(pixels, torch.float32, scale=True)
    return F.normalize(tensor, list(config.get("mean", IMAGENET_MEAN)), list(config.get("std", IMAGENET_STD)))


def to_tensor(image: Image.Image, config: dict) -> torch.Tensor:
    """PIL image -> normalised CHW float tensor: what the model sees, in training and serving."""
    return normalize(to_pixels(image, config), config)


def decode_image(data: bytes, content_type: str = "application/x-image") -> Image.Image:
    """Bytes -> upright RGB image through the shared rule (photos.py), or InvalidInput."""
    if not data:
        raise InvalidInput("empty request body: send the bytes of a JPEG or PNG photo")
    formats = photos.CONTENT_TYPE_FORMATS.get(content_type, photos.FORMATS)
    try:
        return photos.decode(data, formats=formats)
    except photos.ImageRejected as exc:
        raise InvalidInput(f"body is not a decodable {' or '.join(formats)} image "
                           f"(content type {content_type}): {exc.reason}") from None


def load_config(model_dir: str | os.PathLike) -> dict:
    return json.loads((Path(model_dir) / "model_config.json").read_text())


def model_fn(model_dir: str) -> dict:
    """Load weights and settings from an extracted artifact. Returns what predict_fn takes."""
    config = load_config(model_dir)
    model = build_model(config["arch"], len(config["labels"]))
    state = torch.load(Path(model_dir) / "model.pth", map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    return {"model": model, "config": config, "device": device}


def input_fn(request_body: bytes, content_type: str = "image/jpeg") -> Image.Image:
    """Request body -> PIL image. Only image/jpeg, image/png, application/x-image."""
    media_type = (content_type or "").split(";")[0].strip().lower()
    if media_type not in CONTENT_TYPES:
        raise InvalidInput(
            f"unsupported content type {content_type!r}; send one of {', '.join(CONTENT_TYPES)}"
        )
    if isinstance(request_body, str):  # some serving stacks hand over text
        request_body = request_body.encode("latin-1")
    return decode_image(bytes(request_body), media_type)


@torch.inference_mode()
def predict_fn(data: Image.Image | list[Image.Image], model: dict) -> dict | list[dict]:
    """One image -> one prediction dict; a list of images -> a list, scored as one batch."""
    images = data if isinstance(data, list) else [data]
    config = model["config"]
    batch = torch.stack([to_tensor(image, config) for image in images]).to(model["device"])
    probabilities = torch.softmax(model["model"](batch).float(), dim=1).cpu()
    labels = config["labels"]
    version = os.environ.get("MODEL_VERSION") or config.get("model_id", "unknown")
    predictions = [
        {
            "count": int(labels[int(row.argmax())]),
            "probabilities": {str(label): round(float(p), 6) for label, p in zip(labels, row)},
            "model_version": version,
        }
        for row in probabilities
    ]
    return predictions if isinstance(data, list) else predictions[0]


def output_fn(prediction: dict | list[dict], accept: str = JSON) -> str:
    """Prediction -> JSON text. JSON is the only answer format."""
    media_type = (accept or JSON).split(";")[0].strip().lower()
    if media_type not in (JSON, "*/*", ""):
        raise InvalidInput(f"unsupported accept type {accept!r}; this model answers {JSON}")
    return json.dumps(prediction)
