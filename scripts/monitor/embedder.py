"""The served model, loaded from its model.tar.gz through its own serving code, to describe photos
that were captured as bytes only (SageMaker's data capture): each body goes through the
artifact's input_fn (the decoding rule that served it), then photos.statistics and
predict_and_embed, exactly as Evaluate made the baseline and the local capture records.

Without --model the monitor still computes the image statistics, through the photos.py staged
beside it (the same file the artifact carries); embeddings need the model.
"""
from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
import sys
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from types import ModuleType

import numpy as np

_loaded = itertools.count()


class ModelError(Exception):
    """--model cannot be used: one line."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _extract(tarball: Path, dest: Path) -> None:
    try:
        with tarfile.open(tarball, "r:*") as tar:
            for member in tar.getmembers():
                name = PurePosixPath(member.name)
                if name.is_absolute() or ".." in name.parts or not (member.isfile() or member.isdir()):
                    raise ModelError(f"--model {tarball}: refused member {member.name!r} (outside the "
                                     "folder, or not a plain file)")
            tar.extractall(dest, filter="data")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ModelError(f"--model {tarball}: not a readable model.tar.gz ({exc})") from None


class Embedder:
    def __init__(self, tarball: Path):
        if tarball.is_dir():
            tarball = tarball / "model.tar.gz"
        if not tarball.is_file():
            raise ModelError(f"--model {tarball}: no such file (expected model.tar.gz)")
        self.tarball, self.sha256 = tarball, sha256(tarball)
        self._workdir = tempfile.TemporaryDirectory(prefix="invmon-monitor-")
        model_dir = Path(self._workdir.name)
        _extract(tarball, model_dir)
        self.inference = self._import(model_dir / "code" / "inference.py")
        try:
            self.model = self.inference.model_fn(str(model_dir))
        except Exception as exc:  # noqa: BLE001 - a broken artifact is one line
            raise ModelError(f"--model {tarball}: model_fn could not load it ({type(exc).__name__}: {exc})") from None
        try:
            self.model_id = json.loads((model_dir / "model_config.json").read_text()).get("model_id")
        except (OSError, ValueError, AttributeError):
            self.model_id = None
        if not callable(getattr(self.inference, "predict_and_embed", None)):
            raise ModelError(f"--model {tarball}: its code/inference.py has no predict_and_embed "
                             "(an artifact made before embeddings were served)")

    @staticmethod
    def _import(path: Path) -> ModuleType:
        if not path.is_file():
            raise ModelError(f"--model: the artifact has no code/inference.py")
        # Its own name: the artifact's siblings (photos.py, ...) are loaded by path, tied to it.
        spec = importlib.util.spec_from_file_location(f"monitor_artifact_inference_{next(_loaded)}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001
            raise ModelError(f"--model: its code/inference.py failed to import ({type(exc).__name__}: {exc})") from None
        return module

    def describe(self, bodies: list[tuple[bytes, str]], side: int,
                 batch_size: int = 32) -> tuple[list[dict | None], list[np.ndarray | None]]:
        """(statistics, embedding) for each (body, content type); None for a body that does not
        decode (the endpoint refused it too: it never reached the model)."""
        stats: list[dict | None] = [None] * len(bodies)
        embeddings: list[np.ndarray | None] = [None] * len(bodies)
        statistics = self.inference.photos.statistics
        for start in range(0, len(bodies), batch_size):
            images, where = [], []
            for i in range(start, min(start + batch_size, len(bodies))):
                body, content_type = bodies[i]
                try:
                    image = self.inference.input_fn(body, content_type or "application/x-image")
                except ValueError:  # InvalidInput
                    continue
                stats[i] = statistics(image, side)
                images.append(image)
                where.append(i)
            if images:
                _, vectors = self.inference.predict_and_embed(images, self.model)
                for i, vector in zip(where, vectors if vectors is not None else [None] * len(where)):
                    embeddings[i] = None if vector is None else np.asarray(vector, np.float64)
        return stats, embeddings
