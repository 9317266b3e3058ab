"""The model directory (SM_MODEL_DIR, which SageMaker or the local runner tars into model.tar.gz):
model.pth (weights_only loadable), model_config.json, code/ (inference.py and what it needs beyond
the serving image) and TorchServe's manifest; and the job's history.json."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from importlib import metadata
from pathlib import Path

import debugger  # smdebug hook when smdebug imports (debugger.py); else records nothing
import inference
import torch
import torchvision

from trainer.args import parse_args
from trainer.data import LABELS
from trainer.model import build
from trainer.report import TrainError


def model_config(args) -> dict:
    """The preprocessing and label settings the artifact carries (inference.py reads them)."""
    mean, std = inference.normalization(args.arch)
    config = {"arch": args.arch, "labels": list(LABELS), "image_size": args.image_size,
              "mean": list(mean), "std": list(std), "head": args.head, "decode": args.decode, "tta": args.tta}
    if args.tails > 1:  # inference.build_model makes a SharedFront of them
        config.update(tails=args.tails, shared_blocks=args.frozen_blocks)
    return config


def write_artifact(model_dir: Path, best: dict, config: dict) -> None:
    """best["state_dict"] and `config` as the serving container loads them, with their code."""
    model_dir.mkdir(parents=True, exist_ok=True)
    torch.save(best["state_dict"], model_dir / "model.pth")
    (model_dir / "model_config.json").write_text(json.dumps(config, indent=2) + "\n")
    code = model_dir / "code"
    code.mkdir(exist_ok=True)
    serving = Path(inference.__file__).resolve()
    shutil.copy(serving, code / "inference.py")
    shutil.copy(serving.with_name("photos.py"), code / "photos.py")  # inference.py's image rule
    # Self-contained: what model_fn needs beyond the serving image (torch, torchvision, Pillow,
    # numpy) travels inside the artifact, so the serving container installs nothing at start
    # (no code/requirements.txt: the toolkit would pip install it, which needs network).
    if config["arch"] in inference.EFFICIENTNETS:
        vendor_package(*inference.EFFICIENTNET_PACKAGE, code)
    # TorchServe (the SageMaker PyTorch serving container) reads a model folder's manifest: with
    # this one, a model that cannot load turns /ping to 500 "Unhealthy" after 30 s of retries,
    # not TorchServe's default 300 s (the handler stays the toolkit's, which runs code/inference.py).
    (model_dir / "MAR-INF").mkdir(exist_ok=True)
    (model_dir / "MAR-INF" / "MANIFEST.json").write_text(json.dumps(
        {"runtime": "python", "model": {"modelName": "model", "configFile": "MAR-INF/model-config.yaml"}}) + "\n")
    (model_dir / "MAR-INF" / "model-config.yaml").write_text("maxRetryTimeoutInSec: 30\n")


def vendor_package(distribution: str, module: str, code: Path) -> None:
    """Copy an installed pure-Python package's source into code/<module>/, unmodified, with its
    license files and a note of where it comes from (inference.py imports it from there)."""
    dist = metadata.distribution(distribution)
    dest = code / module
    shutil.rmtree(dest, ignore_errors=True)
    files = [f for f in dist.files or () if f.parts[0] == module and f.suffix == ".py"]
    licenses = [f for f in dist.files or () if f.name.upper().startswith(("LICENSE", "NOTICE", "COPYING"))]
    if not files or not licenses:
        raise TrainError(f"cannot put {distribution} in the artifact: its installed files "
                         f"({len(files)} sources, {len(licenses)} license files) are not all there")
    for file in files:
        target = code / Path(*file.parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(dist.locate_file(file), target)
    for file in licenses:
        shutil.copyfile(dist.locate_file(file), dest / file.name)
    (dest / "VENDORED.txt").write_text(
        f"{distribution} {dist.version} ({dist.metadata.get('License') or 'see LICENSE'}), "
        f"its Python source unmodified, copied from the installed distribution at build time.\n"
        f"Home: {dist.metadata.get('Home-page') or 'the package index'}\n")


def weights_digest(state_dict: dict) -> str:
    digest = hashlib.sha256()
    for name, tensor in state_dict.items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def finish(args, best: dict, history: list, config: dict, pretrained: str | None, n_train: int, log) -> None:
    """The kept epoch's metric line, then the model directory (SM_MODEL_DIR) and history.json."""
    metrics = best["metrics"]
    # Repeat the saved (best or last) epoch's metrics last: a tuner reading the last value then
    # scores the model this job actually produced (with --tails, the tails averaged).
    kept = best["epoch"] if isinstance(best["epoch"], int) else ",".join(map(str, best["epoch"]))
    log(f"best_epoch={kept} validation:loss={metrics['loss']:.4f} "
        f"validation:accuracy={metrics['accuracy']:.4f} validation:rmse={metrics['rmse']:.4f}")
    digest = weights_digest(best["state_dict"])
    job = os.environ.get("TRAINING_JOB_NAME", "")
    config = {**config,
              "model_id": job or f"bin-count-{digest[:12]}",
              "weights_sha256": digest,
              "pretrained": pretrained is not None,
              "pretrained_source": pretrained,
              "best_epoch": best["epoch"],
              **({"cuts": best["cuts"]} if "cuts" in best else {}),  # inference.served_cuts
              **({"refit": refit_summary(best["refit"])} if "refit" in best else {}),
              "validation": {k: metrics[k] for k in ("accuracy", "rmse", "loss", "images")},
              "train_images": n_train,
              "hyperparameters": {k: v for k, v in vars(args).items()},
              "training_job": job or None,
              "framework": {"torch": torch.__version__, "torchvision": torchvision.__version__}}
    model_dir = Path(os.environ.get("SM_MODEL_DIR", "/opt/ml/model"))
    write_artifact(model_dir, best, config)
    # With --refit, the photo ids each tail trained on and predicted (trainer.refit).
    photos = {"refit": best["refit"]} if "refit" in best else {}
    (model_dir / "history.json").write_text(json.dumps({"best_epoch": best["epoch"], "epochs": history, **photos})
                                            + "\n")
    debugger.finish(model_dir)  # model_dir/debugger.json: the Debugger trial's summary, or why there is none
    output_dir = os.environ.get("SM_OUTPUT_DATA_DIR")
    if output_dir:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        summary = {"best_epoch": best["epoch"], "model_id": config["model_id"], "epochs": history, **photos}
        (Path(output_dir) / "history.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(f"model {config['model_id']} (epoch {kept}, pretrained={pretrained is not None}) "
        f"written to {model_dir}")


def refit_summary(refit: dict) -> dict:
    """--refit in model_config.json: the parts, and how many photos each tail trained on and
    predicted (history.json lists their ids)."""
    return {"parts": refit["parts"], "seed": refit["seed"],
            "trained_on": [len(t["trained_on"]) for t in refit["tails"]],
            "predicted": [len(t["predicted"]) for t in refit["tails"]], "validation": "out of fold"}


def write_untrained(model_dir: Path, argv: list[str], model_id: str, seed: int = 0) -> Path:
    """The model directory of a randomly initialised network of train.py's arguments `argv`, laid
    out as a trained one: for measuring serving, whose speed does not depend on the weights."""
    args = parse_args(argv)
    torch.manual_seed(seed)
    model = build(args)
    write_artifact(model_dir, {"state_dict": model.state_dict()}, {**model_config(args), "model_id": model_id})
    return model_dir
