"""Evaluate step: score the test split through the model's own serving code.

The model artifact is loaded exactly as an endpoint loads it: model.tar.gz is extracted, its
`code/inference.py` imported, and every test photo goes through `input_fn` as the raw file
bytes with an image content type, then `predict_fn` (one call per batch). What this script
measures is therefore what the endpoint serves.

Writes <output>/evaluation.json in the SageMaker model-quality layout (the pipeline's
PropertyFile; CheckAccuracy reads `multiclass_classification_metrics.accuracy.value`), and
<output>/predictions.csv with one row per scored photo.

Standard deviations (how far the metric could move on another test set of the same size):
  accuracy (overall and per corruption): binomial standard error sqrt(a * (1 - a) / n);
  rmse and weighted precision/recall/f1: bootstrap standard error, 1000 resamples of the test
  set drawn with --seed.

Baseline: <output>/baseline.json (baseline.py), from the same pass: the test photos' embeddings
(the counting head's input, from the same forward passes), predicted-count histogram and image
statistics, which drift monitoring compares served requests with (docs/monitoring.md).

Champion and challenger: the previous registered version (--previous-metrics FILE, or looked up
in the --model-package-group's registry, see previous.py) is scored on the same test photos with
its own code/inference.py, once, without corruptions, after its artifact's bytes are checked
against the SHA-256 recorded at registration (champion.py). evaluation.json's previous_version
holds its scores on these photos and the paired difference with its interval; where it cannot be
scored, why. Its failure is a note, never a failed step.

Report: <output>/report.html, one self-contained page (report.py) with the metrics against the
gate (--threshold) and the previous version on the same photos, the loss curves and
Debugger rule verdicts from what the artifact carries (history.json, debugger.json; rules.py),
the data report (--data-report, optional) and the test photos, worst mistakes first. The
verdicts are also written into evaluation.json under "debugger_rules". A report that cannot be
drawn is said in one line and does not fail the step.

Robustness: each photo is also corrupted (Gaussian blur, Gaussian noise, low light, JPEG
quality 10) at fixed severities with seeded noise, re-encoded and sent through input_fn again,
like a real request carrying a bad photo. Blur and noise scale with the photo's short side so
a severity means the same at any preprocessing size.

Plain CLI: it never imports pipeline/ or steps/.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import hashlib
import json
import math
import os
import sys
import tarfile
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import ModuleType

import numpy as np
from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parent))  # rules.py and report.py sit beside this script
import baseline as drift_baseline  # noqa: E402
import champion  # noqa: E402
import previous as previous_version  # noqa: E402
import report as html_report  # noqa: E402
import rules  # noqa: E402

# Set before the artifact's code imports torch. Spinning OpenMP workers collapse on a shared,
# busy CPU (a batch took 40x longer on 2 loaded cores); passive waiting costs little elsewhere.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

MODEL = "/opt/ml/processing/model"
DATA_REPORT = "/opt/ml/processing/report"
TEST = "/opt/ml/processing/test"
OUTPUT = "/opt/ml/processing/evaluation"
CLASSES = (1, 2, 3, 4, 5)
BOOTSTRAP_SAMPLES = 1000
CONTENT_TYPE_BY_SUFFIX = {".png": "image/png"}  # everything else is sent as image/jpeg

# Fixed severities: the numbers behind each robustness figure, written into the report.
SEVERITY = {
    "blur": {"sigma_fraction_of_short_side": 0.015},
    "noise": {"sigma": 0.10},  # on the 0..1 pixel scale
    "low_light": {"brightness": 0.35, "gamma": 1.5},
    "jpeg": {"quality": 10},
}
CORRUPTIONS = tuple(SEVERITY)
# The module names the two artifacts' code/inference.py are imported under: one process loads
# both, and each artifact's siblings (photos.py...) are imported under its module's name.
CHALLENGER_MODULE = "artifact_inference"
CHAMPION_MODULE = "champion_inference"


class EvaluationError(Exception):
    """A problem with the inputs (missing model, empty test set...): reported, no traceback."""


# --------------------------------------------------------------------------- model loading


def find_tarball(model: Path) -> Path:
    if model.is_file():
        return model
    if model.is_dir():
        tarball = model / "model.tar.gz"
        if tarball.is_file():
            return tarball
        found = ", ".join(sorted(p.name for p in model.iterdir())) or "nothing"
        raise EvaluationError(f"--model {model}: the folder holds no model.tar.gz (found: {found})")
    raise EvaluationError(f"--model {model}: no such file or folder "
                          "(expected model.tar.gz or a folder holding it)")


def safe_extract(tarball: Path, dest: Path) -> None:
    """Extract model.tar.gz, refusing members that would land outside `dest`."""
    try:
        with tarfile.open(tarball, "r:*") as tar:
            for member in tar.getmembers():
                name = PurePosixPath(member.name)
                if name.is_absolute() or ".." in name.parts:
                    raise EvaluationError(f"{tarball}: unsafe member path {member.name!r}")
                if not (member.isfile() or member.isdir()):
                    raise EvaluationError(f"{tarball}: member {member.name!r} is not a plain file "
                                          "or folder (links and devices are refused)")
            tar.extractall(dest, filter="data")  # second line of defence (PEP 706)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise EvaluationError(f"{tarball}: not a readable model.tar.gz ({exc})") from None


def import_inference(code_dir: Path, module_name: str = CHALLENGER_MODULE) -> ModuleType:
    """Import the artifact's own code/inference.py, as the serving container does."""
    path = code_dir / "inference.py"
    if not path.is_file():
        raise EvaluationError("the model artifact has no code/inference.py (the serving code)")
    sys.path.insert(0, str(code_dir))  # the serving container puts code/ on the path too
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise EvaluationError(f"the artifact's code/inference.py failed to import "
                              f"({type(exc).__name__}: {exc})") from None
    for fn in ("model_fn", "input_fn", "predict_fn"):
        if not callable(getattr(module, fn, None)):
            raise EvaluationError(f"code/inference.py in the artifact defines no {fn}()")
    return module


def decoding(config: dict) -> dict:
    """How the artifact turns its class probabilities into a count (model_config.json): beside
    the per-class scores, since moved cuts trade RMSE for the end counts' recall."""
    floor = (config.get("hyperparameters") or {}).get("recall_floor")
    return {**{k: config[k] for k in ("head", "decode", "tta", "cuts") if k in config},
            **({"recall_floor": floor} if floor else {})}


def model_id(model_dir: Path) -> str | None:
    config = model_dir / "model_config.json"
    try:
        return json.loads(config.read_text()).get("model_id")
    except (OSError, ValueError, AttributeError):
        return None


# --------------------------------------------------------------------------- test set


@dataclass
class Photo:
    path: Path
    name: str  # relative to the test folder, for reports
    label: int


def list_test_set(test: Path) -> list[Photo]:
    """Photos under <test>/<count>/, count 1..5. Other entries (manifest.csv...) are ignored."""
    if not test.is_dir():
        raise EvaluationError(f"--test {test}: no such folder (expected <count>/<id>.jpg folders)")
    photos = []
    for folder in sorted(test.iterdir()):
        if not (folder.is_dir() and folder.name.isdigit() and int(folder.name) in CLASSES):
            continue
        for path in sorted(folder.iterdir()):
            if path.is_file() and not path.name.startswith("."):
                photos.append(Photo(path, f"{folder.name}/{path.name}", int(folder.name)))
    if not photos:
        raise EvaluationError(f"--test {test}: no photos in class folders "
                              f"{', '.join(map(str, CLASSES))} (expected <count>/<id>.jpg)")
    return photos


def content_type(path: Path) -> str:
    return CONTENT_TYPE_BY_SUFFIX.get(path.suffix.lower(), "image/jpeg")


# --------------------------------------------------------------------------- corruptions


def corrupt(image: Image.Image, kind: str, seed: int, key: str) -> tuple[bytes, str]:
    """Corrupt a decoded photo and re-encode it: (request body, content type).

    Blur, noise and low light are re-encoded losslessly (PNG) so that only the named
    corruption is measured; the JPEG corruption *is* the encoding.
    """
    image = image.convert("RGB")
    if kind == "jpeg":
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=SEVERITY["jpeg"]["quality"])
        return buffer.getvalue(), "image/jpeg"
    if kind == "blur":
        sigma = max(1.0, SEVERITY["blur"]["sigma_fraction_of_short_side"] * min(image.size))
        image = image.filter(ImageFilter.GaussianBlur(radius=sigma))
    elif kind == "noise":
        # Seeded per photo (not per batch), so results do not depend on --batch-size.
        rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
        pixels = np.asarray(image, dtype=np.float32) / 255.0
        pixels = pixels + rng.normal(0.0, SEVERITY["noise"]["sigma"], pixels.shape)
        image = Image.fromarray((np.clip(pixels, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))
    elif kind == "low_light":
        s = SEVERITY["low_light"]
        pixels = np.asarray(image, dtype=np.float32) / 255.0
        pixels = s["brightness"] * pixels ** s["gamma"]
        image = Image.fromarray((pixels * 255.0 + 0.5).astype(np.uint8))
    else:
        raise ValueError(f"unknown corruption {kind!r}")
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=0)  # speed over size: it never leaves memory
    return buffer.getvalue(), "image/png"


# --------------------------------------------------------------------------- metrics


def binomial_sd(accuracy: float, n: int) -> float:
    return math.sqrt(accuracy * (1.0 - accuracy) / n) if n else 0.0


def rmse(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.sqrt(np.mean((y_pred - y_true) ** 2))) if len(y_true) else float("nan")


def weighted_prf(y_true: np.ndarray, y_pred: np.ndarray,
                 labels: list[int]) -> tuple[float, float, float]:
    """Support-weighted precision, recall and F1 (scikit-learn's 'weighted' average)."""
    precision = recall = f1 = 0.0
    n = len(y_true)
    for label in labels:
        support = int(np.sum(y_true == label))
        if not support:
            continue
        tp = int(np.sum((y_true == label) & (y_pred == label)))
        predicted = int(np.sum(y_pred == label))
        p = tp / predicted if predicted else 0.0
        r = tp / support
        precision += support / n * p
        recall += support / n * r
        f1 += support / n * (2 * p * r / (p + r) if p + r else 0.0)
    return precision, recall, f1


def bootstrap_sd(y_true: np.ndarray, y_pred: np.ndarray, labels: list[int],
                 seed: int) -> dict[str, float]:
    """Bootstrap standard errors of rmse and the weighted precision/recall/f1."""
    rng = np.random.default_rng(seed)
    n = len(y_true)
    samples = {"rmse": [], "weighted_precision": [], "weighted_recall": [], "weighted_f1": []}
    for _ in range(BOOTSTRAP_SAMPLES):
        idx = rng.integers(0, n, n)
        t, p = y_true[idx], y_pred[idx]
        samples["rmse"].append(rmse(t, p))
        prf = weighted_prf(t, p, labels)
        for key, value in zip(("weighted_precision", "weighted_recall", "weighted_f1"), prf):
            samples[key].append(value)
    return {key: float(np.std(values, ddof=1)) if n > 1 else 0.0 for key, values in samples.items()}


def metric(value: float, sd: float) -> dict:
    return {"value": round(float(value), 6), "standard_deviation": round(float(sd), 6)}


def constant_baselines(y_true: np.ndarray, labels: list[int]) -> dict:
    """What always giving one answer scores on this test split: the bar below which a model has
    learnt nothing. `majority` is the answer with the best accuracy, `lowest_rmse` the one with the
    lowest RMSE (on real ABID always answering 3, an RMSE of 1.28 on the sample). Both are picked
    on the test split itself, so no constant answer could do better: a strict bar."""
    scored = {c: (float(np.mean(y_true == c)), rmse(y_true, np.full_like(y_true, c))) for c in labels}
    best = {"majority": max(labels, key=lambda c: (scored[c][0], -scored[c][1])),
            "lowest_rmse": min(labels, key=lambda c: (scored[c][1], -scored[c][0]))}
    return {name: {"answer": int(c), "accuracy": round(scored[c][0], 6), "rmse": round(scored[c][1], 6)}
            for name, c in best.items()}


def build_report(y_true: np.ndarray, y_pred: np.ndarray, labels: list[int], seed: int) -> dict:
    n = len(y_true)
    accuracy = float(np.mean(y_true == y_pred))
    sds = bootstrap_sd(y_true, y_pred, labels, seed)
    precision, recall, f1 = weighted_prf(y_true, y_pred, labels)
    confusion = {
        str(t): {str(p): int(np.sum((y_true == t) & (y_pred == p))) for p in labels} for t in labels
    }
    per_class = {}
    for label in labels:
        mask = y_true == label
        support = int(mask.sum())
        per_class[str(label)] = {
            "support": support,
            "accuracy": round(float(np.mean(y_pred[mask] == label)), 6) if support else None,
            "rmse": round(rmse(y_true[mask], y_pred[mask]), 6) if support else None,
        }
    return {
        "multiclass_classification_metrics": {
            "accuracy": metric(accuracy, binomial_sd(accuracy, n)),
            "weighted_precision": metric(precision, sds["weighted_precision"]),
            "weighted_recall": metric(recall, sds["weighted_recall"]),
            "weighted_f1": metric(f1, sds["weighted_f1"]),
            "confusion_matrix": confusion,
        },
        "regression_metrics": {"rmse": metric(rmse(y_true, y_pred), sds["rmse"])},
        "per_class": per_class,
        "constant_answer_baselines": constant_baselines(y_true, labels),
    }


# --------------------------------------------------------------------------- scoring


@dataclass
class Scores:
    names: list[str] = field(default_factory=list)
    y_true: list[int] = field(default_factory=list)
    y_pred: list[int] = field(default_factory=list)
    corrupted: dict[str, list[int]] = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)
    model_version: str | None = None
    embeddings: list[np.ndarray] = field(default_factory=list)  # one [batch, D] array a batch
    image_stats: list[dict] = field(default_factory=list)  # one a scored photo (baseline.json)


def predict_counts(inference: ModuleType, model, images: list,
                   embed: bool = False) -> tuple[list[int], str | None, np.ndarray | None]:
    """predict_fn's counts; with `embed`, the embeddings of the same forward pass too."""
    if embed:
        predictions, embeddings = inference.predict_and_embed(images, model)
    else:
        predictions, embeddings = inference.predict_fn(images, model), None
    version = predictions[0].get("model_version") if predictions else None
    return [int(p["count"]) for p in predictions], version, embeddings


def baseline_functions(inference: ModuleType, model) -> tuple[bool, object, int | None]:
    """(embeddings available, photos.statistics or None, its side): what this artifact's serving
    code offers for baseline.json. An artifact made before they existed has neither."""
    embed = callable(getattr(inference, "predict_and_embed", None))
    statistics = getattr(getattr(inference, "photos", None), "statistics", None)
    config = model.get("config") if isinstance(model, dict) else None
    side = int(config["image_size"]) if isinstance(config, dict) and "image_size" in config else None
    return embed, (statistics if callable(statistics) and side else None), side


def score(inference: ModuleType, model, photos: list[Photo], batch_size: int,
          corruptions: list[str], seed: int, baseline: bool = True) -> Scores:
    """Decode each photo through input_fn, predict in batches, and again per corruption; with
    `baseline`, the embeddings and image statistics baseline.json is made of too."""
    invalid = getattr(inference, "InvalidInput", ValueError)
    scores = Scores(corrupted={kind: [] for kind in corruptions})
    embed, statistics, side = baseline_functions(inference, model) if baseline else (False, None, None)
    started = time.monotonic()
    for start in range(0, len(photos), batch_size):
        batch, images = [], []
        for photo in photos[start:start + batch_size]:
            try:
                images.append(inference.input_fn(photo.path.read_bytes(), content_type(photo.path)))
                batch.append(photo)
            except (invalid, OSError, ValueError) as exc:
                scores.skipped.append({"path": photo.name, "reason": str(exc)})
                print(f"skipped {photo.name}: {exc}", flush=True)
        if not images:
            continue
        counts, version, embeddings = predict_counts(inference, model, images, embed)
        if embeddings is not None:
            scores.embeddings.append(embeddings)
        if statistics is not None:
            scores.image_stats += [statistics(image, side) for image in images]
        scores.model_version = scores.model_version or version
        scores.names += [p.name for p in batch]
        scores.y_true += [p.label for p in batch]
        scores.y_pred += counts
        for kind in corruptions:
            corrupted = []
            for photo, image in zip(batch, images):
                body, ctype = corrupt(image, kind, seed, photo.name)
                corrupted.append(inference.input_fn(body, ctype))
            scores.corrupted[kind] += predict_counts(inference, model, corrupted)[0]
        done = min(start + batch_size, len(photos))
        print(f"scored {done}/{len(photos)} photos ({time.monotonic() - started:.1f}s)", flush=True)
    return scores


# --------------------------------------------------------------------------- main


def parse_corruptions(text: str) -> list[str]:
    if text.strip().lower() == "all":
        return list(CORRUPTIONS)
    if text.strip().lower() in ("none", ""):
        return []
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in CORRUPTIONS]
    if unknown:
        raise EvaluationError(f"--corruptions: unknown {', '.join(unknown)}; "
                              f"choose from {', '.join(CORRUPTIONS)}, 'all' or 'none'")
    return names


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def evaluate(args: argparse.Namespace) -> dict:
    corruptions = parse_corruptions(args.corruptions)
    if args.batch_size < 1:
        raise EvaluationError(f"--batch-size must be at least 1, got {args.batch_size}")
    # The gate's threshold, checked here too: an execution started past `invmon start` (the
    # StartPipelineExecution API) must not switch the gate off with -inf or nan.
    if args.threshold is not None and not 0 <= args.threshold <= 1:
        raise EvaluationError(f"--threshold {args.threshold} refused: AccuracyThreshold takes 0 to 1")
    tarball = find_tarball(Path(args.model))
    photos = list_test_set(Path(args.test))
    with tempfile.TemporaryDirectory(prefix="invmon-eval-") as tmp:
        model_dir = Path(tmp)
        safe_extract(tarball, model_dir)
        inference = import_inference(model_dir / "code")
        try:
            model = inference.model_fn(str(model_dir))
        except Exception as exc:  # a broken artifact is an input problem: say what broke
            raise EvaluationError(f"{tarball}: the artifact's model_fn could not load it "
                                  f"({type(exc).__name__}: {exc})") from None
        print(f"evaluating {tarball} on {len(photos)} photos from {args.test}"
              f" (corruptions: {', '.join(corruptions) or 'none'})", flush=True)
        scores = score(inference, model, photos, args.batch_size, corruptions, args.seed)
        identity = model_id(model_dir) or scores.model_version
        how = decoding(model.get("config") or {}) if isinstance(model, dict) else {}
        class_labels = labels_of(model)
        embed, statistics, side = baseline_functions(inference, model)
        stat_names = tuple(getattr(inference.photos, "STATISTICS", ())) if statistics else ()
        history = read_json(model_dir / "history.json")
        debugger = read_json(model_dir / "debugger.json")
    if not scores.y_true:
        raise EvaluationError(f"--test {args.test}: none of the {len(photos)} photos could be decoded")

    y_true, y_pred = np.array(scores.y_true), np.array(scores.y_pred)
    labels = sorted(set(CLASSES) | set(scores.y_true) | set(scores.y_pred))
    report = build_report(y_true, y_pred, labels, args.seed)
    robustness = {}
    for kind, predicted in scores.corrupted.items():
        acc = float(np.mean(np.array(predicted) == y_true))
        robustness[kind] = {"accuracy": round(acc, 6),
                            "accuracy_standard_deviation": round(binomial_sd(acc, len(y_true)), 6),
                            "rmse": round(rmse(y_true, np.array(predicted)), 6),
                            "severity": SEVERITY[kind]}
    sha256 = file_sha256(tarball)
    received = read_received_statistics(args.data_report, side, stat_names)
    baseline = make_baseline(scores, identity, sha256, labels, embed, stat_names, side, args.seed, received)
    report.update({
        # What was scored, byte for byte: Register records it and every deploy checks it.
        "artifact": {"sha256": sha256},
        "robustness": robustness,
        "test_images": len(y_true),
        "skipped": scores.skipped,
        "model_id": identity,
        "decoding": how,
        "standard_deviation": {
            "accuracy": "binomial standard error sqrt(a*(1-a)/n)",
            "other": f"bootstrap standard error, {BOOTSTRAP_SAMPLES} resamples, seed {args.seed}",
        },
    })

    verdicts, debugger_note = rule_verdicts(history, debugger)
    report["debugger_rules"] = {"note": debugger_note, "verdicts": verdicts}
    before, why_none = previous_version.lookup(args.model_package_group, args.previous_metrics)
    report["previous_version"] = compare_with_previous(before, photos, scores, class_labels, args) \
        if before else {"note": why_none}
    print(f"compared with: {why_none or _version_name(before)}{_comparison_line(report['previous_version'])}",
          flush=True)

    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "evaluation.json").write_text(json.dumps(report, indent=2) + "\n")
    (output / "baseline.json").write_text(json.dumps(baseline, indent=1) + "\n")
    print(f"wrote {output / 'baseline.json'}: {baseline_line(baseline)}", flush=True)
    with open(output / "predictions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "prediction", *corruptions])
        for i, name in enumerate(scores.names):
            writer.writerow([name, scores.y_true[i], scores.y_pred[i],
                             *(scores.corrupted[kind][i] for kind in corruptions)])
    write_html_report(args, report, scores, history, debugger, verdicts, debugger_note,
                      report["previous_version"] if before else None, why_none)
    return report


def labels_of(model) -> list | None:
    config = model.get("config") if isinstance(model, dict) else None
    labels = config.get("labels") if isinstance(config, dict) else None
    return list(labels) if isinstance(labels, list) else None


def compare_with_previous(before: dict, photos: list[Photo], scores: Scores, labels: list | None,
                          args: argparse.Namespace) -> dict:
    """evaluation.json's previous_version: the version, the metrics it was registered with
    (measured on its own test split: other photos, never compared), and its scores on this run's
    test photos with the paired difference, or a note saying why it could not be scored.
    Nothing the previous version does fails this step."""
    found = {k: before[k] for k in ("group", "version", "status") if k in before}
    if before.get("artifact"):
        found["artifact"] = before["artifact"]
    found["recorded_metrics"] = before.get("metrics") or {}
    try:
        found.update(score_previous(before, photos, scores, labels, args))
    except champion.ChampionError as exc:
        found["note"] = f"{champion.name(before)} was not scored on these photos: {exc}"
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - its own code, run here: whatever it raises
        found["note"] = (f"{champion.name(before)} was not scored on these photos: it failed "
                         f"({champion.describe(exc)})")
    return found


def score_previous(before: dict, photos: list[Photo], scores: Scores, labels: list | None,
                   args: argparse.Namespace) -> dict:
    """The previous version's artifact, verified, loaded through its own code/inference.py and
    scored once (no corruptions) on the photos this run scored: {"these_photos", "difference"}."""
    artifact = before.get("artifact") or {}
    uri = artifact.get("uri", "")
    scored_here = dict(zip(scores.names, scores.y_pred))
    with tempfile.TemporaryDirectory(prefix="invmon-champion-") as tmp:
        tarball, actual = champion.fetch(uri, Path(tmp))
        champion.verify(uri, actual, artifact.get("sha256", ""))
        model_dir = Path(tmp) / "model"
        code_dir = str(model_dir / "code")
        try:
            safe_extract(tarball, model_dir)
            inference = import_inference(model_dir / "code", CHAMPION_MODULE)
            try:
                model = inference.model_fn(str(model_dir))
            except Exception as exc:  # noqa: BLE001
                raise champion.ChampionError(f"its model_fn could not load it ({champion.describe(exc)})") from None
            champion.same_labels(labels, labels_of(model))
            print(f"scoring {champion.name(before)} ({uri}) on the same {len(scored_here)} photos", flush=True)
            theirs = score(inference, model, [p for p in photos if p.name in scored_here], args.batch_size,
                           [], args.seed, baseline=False)
        except EvaluationError as exc:
            raise champion.ChampionError(str(exc)) from None
        finally:  # its code leaves the process's import state as it found it
            while code_dir in sys.path:
                sys.path.remove(code_dir)
            for module in [m for m in sys.modules if m == CHAMPION_MODULE or m.startswith(CHAMPION_MODULE + "__")]:
                del sys.modules[module]
    if not theirs.y_pred:
        raise champion.ChampionError("its code decoded none of these photos")
    y_true = np.array(theirs.y_true)
    ours = np.array([scored_here[name] for name in theirs.names])
    measured = build_report(y_true, np.array(theirs.y_pred), sorted(set(CLASSES) | set(y_true.tolist())), args.seed)
    these_photos = {"photos": len(y_true),
                    "accuracy": measured["multiclass_classification_metrics"]["accuracy"],
                    "rmse": measured["regression_metrics"]["rmse"],
                    "weighted_f1": measured["multiclass_classification_metrics"]["weighted_f1"]}
    if theirs.skipped:  # compared on the photos both models scored; the rest are named
        these_photos["skipped"] = theirs.skipped
    return {"these_photos": these_photos,
            "difference": champion.paired_difference(y_true, ours, theirs.y_pred, args.seed)}


def _comparison_line(previous: dict) -> str:
    if "difference" in previous:
        d = previous["difference"]
        return (f" on the same {d['photos']} photos, accuracy {d['accuracy']['value']:+.4f} "
                f"[{d['accuracy']['interval'][0]:+.4f}, {d['accuracy']['interval'][1]:+.4f}], "
                f"rmse {d['rmse']['value']:+.4f} [{d['rmse']['interval'][0]:+.4f}, {d['rmse']['interval'][1]:+.4f}]")
    return f"; {previous['note']}" if previous.get("note") and previous.get("version") is not None else ""


def read_received_statistics(data_report: str | None, side: int | None,
                             names: tuple[str, ...]) -> tuple[list[dict] | None, str]:
    """Preprocess's image statistics of every photo as received (report/image_statistics*.json,
    one per shard), when they were measured at the model's side: (rows, where from), else
    (None, why not)."""
    folder = Path(data_report) if data_report else None
    files = sorted(folder.glob("image_statistics*.json")) if folder and folder.is_dir() else []
    if not files or not side or not names:
        return None, "no image statistics from Preprocess (made before it wrote them)"
    rows = []
    for path in files:
        document = read_json(path) or {}
        if document.get("side") != side or not set(names) <= set(document.get("names", ())):
            return None, (f"Preprocess measured its image statistics at {document.get('side')} px, "
                          f"the model sees {side} px")
        values = document["values"]
        rows += [{name: values[name][i] for name in names} for i in range(int(document["photos"]))]
    return (rows, f"every photo Preprocess accepted, as received ({len(rows)})") if rows else \
        (None, "Preprocess accepted no photos")


def make_baseline(scores: Scores, identity: str | None, sha256: str, labels: list[int], embed: bool,
                  stat_names: tuple[str, ...], side: int | None, seed: int,
                  received: tuple[list[dict] | None, str] = (None, "")) -> dict:
    """baseline.json. Its image statistics are those of the photos as the endpoint receives them
    (Preprocess's, every split) when Preprocess measured them at the model's side: more photos
    than the test split, and no resized copy among them. Else the test split's, and a note says
    why."""
    notes = []
    embeddings = np.concatenate(scores.embeddings) if scores.embeddings else None
    if not embed:
        notes.append("no embeddings: the artifact's code/inference.py has no predict_and_embed")
    elif embeddings is None:
        notes.append("no embeddings: the artifact's network has no counting head to read them from")
    if not stat_names:
        notes.append("no image statistics: the artifact's code/photos.py has no statistics()")
    stats, source = received
    if stat_names and stats is None:
        notes.append(f"image statistics of the test split's photos alone, not of every photo as received: {source}")
    return drift_baseline.build(model_id=identity, artifact_sha256=sha256, counts=scores.y_pred,
                                labels=labels, embeddings=embeddings,
                                stats=stats if stats is not None else scores.image_stats,
                                stat_names=stat_names, side=side, seed=seed, notes=notes,
                                statistics_from=source if stats is not None else "the test split")


def baseline_line(baseline: dict) -> str:
    parts = [f"{baseline['made']['photos']} photos"]
    if baseline["embeddings"]:
        e = baseline["embeddings"]
        parts.append(f"embeddings {e['dimension']}-d -> {e['projection']['components']} PCA components "
                     f"({e['projection']['explained_variance']:.0%} of the variance), "
                     f"{e['sample_size']} kept")
    if baseline["image_statistics"]:
        parts.append(f"image statistics at {baseline['image_statistics']['side']} px")
    return ", ".join(parts + baseline["notes"])


def _version_name(before: dict) -> str:
    status = f", {before['status']}" if before.get("status") else ""
    return f"{before.get('group') or 'version'} {before.get('version')}{status}"


def read_json(path: Path | None) -> dict | None:
    try:
        return json.loads(path.read_text()) if path else None
    except (OSError, ValueError):
        return None


def rule_verdicts(history: dict | None, debugger: dict | None) -> tuple[list[dict], str]:
    """The four Debugger rules on the recorded trial, or on the per-epoch losses when there is none."""
    if debugger and debugger.get("status") == "recorded":
        record = debugger
        note = (f"Debugger data recorded by smdebug {debugger.get('smdebug', '?')}: "
                f"{len((debugger.get('losses') or {}).get('train') or [])} training loss steps, "
                f"{len(debugger.get('gradients') or {})} gradient tensors.")
    else:
        why = (debugger or {}).get("reason") or "the model artifact has no debugger.json"
        record = rules.history_from_epochs((history or {}).get("epochs") or [])
        note = (f"Debugger data missing ({why}): the loss rules use the per-epoch losses of "
                f"history.json, the gradient and tensor rules have no data.")
    return [v.to_dict() for v in rules.evaluate_rules(record)], note


def read_data_report(path: str | None) -> dict | None:
    if not path:
        return None
    target = Path(path)
    return read_json(target / "data_report.json" if target.is_dir() else target)


def write_html_report(args, report: dict, scores, history, debugger, verdicts, note,
                      before: dict | None, why_none: str) -> None:
    output = Path(args.output)
    rows = [{"path": n, "label": t, "prediction": p}
            for n, t, p in zip(scores.names, scores.y_true, scores.y_pred)]
    recorded = debugger if (debugger or {}).get("status") == "recorded" else {}
    try:
        page = html_report.render(
            report, rows, Path(args.test), history=history, verdicts=verdicts, debugger_note=note,
            debugger_losses=recorded.get("losses"), learning_rate=recorded.get("learning_rate"),
            data_report=read_data_report(args.data_report), previous=before, previous_note=why_none,
            threshold=args.threshold)
    except (html_report.ReportError, OSError) as exc:
        print(f"report: not written ({exc})", flush=True)
        return
    (output / "report.html").write_text(page)
    print(f"wrote {output / 'report.html'}", flush=True)


def summary(report: dict) -> str:
    acc = report["multiclass_classification_metrics"]["accuracy"]
    err = report["regression_metrics"]["rmse"]
    lines = [
        f"model {report['model_id']}: {report['test_images']} test photos, "
        f"{len(report['skipped'])} skipped",
        f"accuracy {acc['value']:.4f} (sd {acc['standard_deviation']:.4f}), "
        f"rmse {err['value']:.4f} (sd {err['standard_deviation']:.4f})",
        "per class: " + ", ".join(
            f"{label}: n={c['support']} acc=" + ("-" if c["accuracy"] is None else f"{c['accuracy']:.3f}")
            for label, c in report["per_class"].items()),
    ]
    baselines = report["constant_answer_baselines"]
    lines.append(f"always answering {baselines['majority']['answer']}: accuracy "
                 f"{baselines['majority']['accuracy']:.4f}; the lowest rmse of a constant answer: "
                 f"{baselines['lowest_rmse']['rmse']:.4f} (always {baselines['lowest_rmse']['answer']})")
    for kind, r in report["robustness"].items():
        lines.append(f"under {kind}: accuracy {r['accuracy']:.4f}, rmse {r['rmse']:.4f}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=MODEL, help="model.tar.gz, or a folder holding it")
    parser.add_argument("--test", default=TEST, help="test split: <count>/<id>.jpg folders")
    parser.add_argument("--output", default=OUTPUT, help="where evaluation.json is written")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--corruptions", default="all",
                        help=f"comma-separated subset of {','.join(CORRUPTIONS)}, 'all' or 'none'")
    parser.add_argument("--seed", type=int, default=0, help="noise corruption and bootstrap seed")
    parser.add_argument("--data-report", default=None,
                        help="Preprocess's data report (data_report.json or its folder) for report.html")
    parser.add_argument("--previous-metrics", default=None,
                        help='JSON {"version": ..., "metrics": {"accuracy": ..., "rmse": ...}, "artifact": '
                             '{"uri": ..., "sha256": ...}} of the previous registered version: its artifact is '
                             "scored on the same test photos and compared in report.html")
    parser.add_argument("--model-package-group", default=None,
                        help="without --previous-metrics: look up this group's newest Approved (else "
                             "newest) version in the model registry and compare with it (previous.py)")
    parser.add_argument("--threshold", type=float, default=None, help="the accuracy gate, shown in report.html")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = evaluate(args)
    except EvaluationError as exc:
        print(f"evaluate: error: {exc}", file=sys.stderr)
        return 2
    print(summary(report))
    # name=value lines, the form the pipeline's log readers parse.
    print(f"accuracy={report['multiclass_classification_metrics']['accuracy']['value']}")
    print(f"rmse={report['regression_metrics']['rmse']['value']}")
    print(f"wrote {Path(args.output) / 'evaluation.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
