"""The champion against the challenger on the same photos.

The champion is the previous registered version (previous.py chooses it: the newest Approved,
else the newest). Evaluate scores its artifact on this run's test photos with the champion's own
code/inference.py (evaluate.py loads it), so the two models are compared on the same photos:
this module fetches the artifact, checks its bytes against the SHA-256 recorded at
registration, and computes the paired difference.

The paired difference (challenger minus champion, accuracy and RMSE) comes with a percentile
interval from a paired bootstrap over photos: each resample draws photos with replacement and
scores both models on the same draw, so what the two models have in common (the hard photos)
cancels out. Seeded, so an evaluation is reproducible.

Anything that stops the re-scoring is a ChampionError, whose message the report prints instead
of a difference; it never fails the Evaluate step.

Plain module of the Evaluate step: standard library and numpy; boto3 only for an s3:// artifact.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95
CHUNK = 250  # resamples drawn at once: 250 x n photo indices in memory


class ChampionError(Exception):
    """Why the champion was not scored on these photos: said in the report, never a failure."""


def name(previous: dict) -> str:
    status = f" ({previous['status']})" if previous.get("status") else ""
    return f"version {previous.get('version')}{status}"


def fetch(uri: str, dest: Path, s3=None) -> tuple[Path, str]:
    """The artifact at `uri` (s3://, file:// or a path) copied into the folder `dest`, and the
    SHA-256 of the copy: the bytes that are checked are the bytes that are loaded."""
    if not uri:
        raise ChampionError("the registry records no artifact for it")
    target = dest / "model.tar.gz"
    if uri.startswith("s3://"):
        bucket, _, key = uri[5:].partition("/")
        if not bucket or not key or key.endswith("/"):
            raise ChampionError(f"its artifact {uri} does not name an object")
        try:
            s3 = s3 or _s3_client()
            return target, _copy(s3.get_object(Bucket=bucket, Key=key)["Body"].iter_chunks(1 << 20), target)
        except Exception as exc:  # noqa: BLE001 - no permission, no network, no such key: say so
            raise ChampionError(f"its artifact {uri} could not be read ({describe(exc)})") from None
    path = Path(unquote(urlparse(uri).path)) if uri.startswith("file://") else Path(uri)
    if path.is_dir():  # a training job's model output holds model.tar.gz
        path = path / "model.tar.gz"
    if not path.is_file():
        raise ChampionError(f"its artifact {uri} is not there")
    try:
        with open(path, "rb") as f:
            return target, _copy(iter(lambda: f.read(1 << 20), b""), target)
    except OSError as exc:
        raise ChampionError(f"its artifact {uri} could not be read ({describe(exc)})") from None


def _copy(blocks, target: Path) -> str:
    digest = hashlib.sha256()
    with open(target, "wb") as out:
        for block in blocks:
            digest.update(block)
            out.write(block)
    return digest.hexdigest()


def verify(uri: str, actual: str, recorded: str) -> None:
    """Only the bytes that were registered are loaded: their code runs in this job."""
    if not recorded:
        raise ChampionError("the registry records no SHA-256 of its artifact, so the artifact "
                            "cannot be verified and was not loaded")
    if actual != recorded:
        raise ChampionError(f"its artifact {uri} has SHA-256 {actual}, the registry recorded "
                            f"{recorded}: not the registered artifact, so it was not loaded")


def same_labels(challenger: list | None, champion: list | None) -> None:
    if challenger is not None and champion is not None and list(challenger) != list(champion):
        raise ChampionError(f"it counts with other class labels ({list(champion)}) than this "
                            f"model ({list(challenger)}): its answers are not comparable")


def paired_difference(y_true, challenger, champion, seed: int, resamples: int = RESAMPLES,
                      level: float = LEVEL) -> dict:
    """Challenger minus champion on the same photos: accuracy and RMSE, each with a paired
    bootstrap percentile interval, and how many photos only one of the two got right."""
    y_true, a, b = (np.asarray(v, dtype=np.int64) for v in (y_true, challenger, champion))
    n = len(y_true)
    if not n or len(a) != n or len(b) != n:
        raise ValueError(f"paired scores of unequal or no length: {n}, {len(a)}, {len(b)}")
    right_a, right_b = (a == y_true).astype(float), (b == y_true).astype(float)
    sq_a, sq_b = ((a - y_true) ** 2).astype(float), ((b - y_true) ** 2).astype(float)
    rng = np.random.default_rng(seed)
    accuracy, rmse = [], []
    for start in range(0, resamples, CHUNK):
        idx = rng.integers(0, n, (min(CHUNK, resamples - start), n))
        accuracy.append(right_a[idx].mean(axis=1) - right_b[idx].mean(axis=1))
        rmse.append(np.sqrt(sq_a[idx].mean(axis=1)) - np.sqrt(sq_b[idx].mean(axis=1)))
    tails = [(1 - level) / 2, (1 + level) / 2]

    def summary(value: float, samples: list) -> dict:
        low, high = np.quantile(np.concatenate(samples), tails)
        return {"value": round(float(value), 6), "interval": [round(float(low), 6), round(float(high), 6)]}

    return {
        "photos": n,
        "accuracy": summary(right_a.mean() - right_b.mean(), accuracy),
        "rmse": summary(np.sqrt(sq_a.mean()) - np.sqrt(sq_b.mean()), rmse),
        "only_this_model_right": int(np.sum((right_a == 1) & (right_b == 0))),
        "only_previous_right": int(np.sum((right_a == 0) & (right_b == 1))),
        "interval": f"{level:.0%} paired bootstrap percentile interval over photos, "
                    f"{resamples} resamples, seed {seed}",
    }


def _s3_client():
    import boto3
    from botocore.config import Config

    # Short timeouts, as previous.py's: a job in a VPC without S3 access must not stall.
    return boto3.client("s3", config=Config(connect_timeout=10, read_timeout=60,
                                            retries={"max_attempts": 3}))


def describe(exc: BaseException) -> str:
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
