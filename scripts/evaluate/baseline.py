"""baseline.json: what the model's test photos look like to it, for drift monitoring.

Evaluate writes it beside evaluation.json, from the same pass over the test split (the same
decoding, the same forward passes), so it travels with every registered version. The monitor
(scripts/monitor/) compares a window of served requests with it (docs/monitoring.md):

- embeddings: the input of the counting head (inference.predict_and_embed) of every test photo.
  The test photos are split in two, seeded: a PCA is fitted on one part (its mean and components
  are stored, so served embeddings are projected the same way), and the other part, projected, is
  the reference sample of the two-sample test. Never both from the same photos: a PCA fitted on
  the reference spreads the reference wider along its components than any new photos, and the
  test then found drift in 22% of windows of unchanged real photos at a 5% level (in 5% with the
  parts apart; docs/monitoring.md). Their mean and covariance summarise all of them;
- predicted counts: the histogram of the model's answers on the test photos;
- image statistics: brightness, contrast, sharpness, width and height (photos.statistics, the
  definition the endpoint's capture and the monitor use too) of every photo Preprocess accepted,
  as received (its report/image_statistics.json); of the test photos when Preprocess did not
  measure them at the model's side.

Arrays are stored as {"dtype": "float32", "shape": [...], "base64": ...} (little-endian): a
32 x 1280 projection is 160 KB that way, against 500 KB as JSON numbers.

Plain numpy: no torch, no project code.
"""
from __future__ import annotations

import base64
from datetime import datetime, timezone

import numpy as np

FORMAT = 1
COMPONENTS = 32  # projected dimensions kept (fewer when there are fewer photos or features)
SAMPLE = 1000  # reference vectors kept for the two-sample test
STATISTICS_SAMPLE = 5000  # per-photo image statistics kept for the KS tests


def encode_array(values: np.ndarray) -> dict:
    values = np.ascontiguousarray(values, dtype="<f4")
    return {"dtype": "float32", "shape": list(values.shape),
            "base64": base64.b64encode(values.tobytes()).decode("ascii")}


def decode_array(record: dict) -> np.ndarray:
    values = np.frombuffer(base64.b64decode(record["base64"]), dtype="<f4")
    return values.reshape(record["shape"]).astype(np.float64)


def fit_projection(embeddings: np.ndarray, components: int = COMPONENTS) -> tuple[np.ndarray, np.ndarray]:
    """PCA: (mean [D], components [k, D]), the directions the test photos vary most along."""
    mean = embeddings.mean(0)
    k = max(1, min(components, embeddings.shape[0] - 1, embeddings.shape[1]))
    # SVD of the centred data: rows of vt are the principal directions, largest variance first.
    _, _, vt = np.linalg.svd(embeddings - mean, full_matrices=False)
    directions = vt[:k]
    # A fixed sign per direction (largest coefficient positive): the same data, the same file.
    signs = np.sign(directions[np.arange(k), np.abs(directions).argmax(1)])
    return mean, directions * np.where(signs == 0, 1, signs)[:, None]


def split(n: int, seed: int, sample: int = SAMPLE) -> tuple[np.ndarray, np.ndarray]:
    """(reference, fit) photo indices, sorted: half the photos (at most `sample`) are the
    reference, the others fit the projection."""
    order = np.random.default_rng(seed).permutation(n)
    size = min(sample, n // 2)
    return np.sort(order[:size]), np.sort(order[size:])


def embedding_summary(embeddings: np.ndarray, seed: int, sample: int = SAMPLE,
                      components: int = COMPONENTS) -> dict:
    embeddings = np.asarray(embeddings, dtype=np.float64)
    reference, fit = split(len(embeddings), seed, sample)
    mean, directions = fit_projection(embeddings[fit], components)
    projected = (embeddings - mean) @ directions.T
    centred = embeddings[reference] - mean
    explained = float(np.sum(projected[reference] ** 2) / max(np.sum(centred ** 2), 1e-12))
    return {
        "photos": int(len(embeddings)),
        "dimension": int(embeddings.shape[1]),
        "projection": {"method": "pca", "components": int(directions.shape[0]), "fitted_on": int(len(fit)),
                       "explained_variance": round(explained, 6),  # of the reference photos
                       "mean": encode_array(mean), "directions": encode_array(directions)},
        "sample": encode_array(projected[reference]),
        "sample_size": int(len(reference)),
        "sample_index": [int(i) for i in reference],  # which test photos, in Evaluate's order
        "mean": [round(float(v), 6) for v in projected.mean(0)],
        "covariance": encode_array(np.cov(projected, rowvar=False).reshape(len(directions), len(directions))),
    }


def statistics_summary(stats: list[dict], names: tuple[str, ...], side: int, seed: int,
                       sample: int = STATISTICS_SAMPLE, source: str = "the test split") -> dict:
    rng = np.random.default_rng([seed, 1])
    kept = np.sort(rng.choice(len(stats), min(sample, len(stats)), replace=False)) if stats else []
    values = {name: [stats[i][name] for i in kept] for name in names}
    summary = {}
    for name in names:
        column = np.array([s[name] for s in stats], dtype=np.float64)
        summary[name] = {"mean": round(float(column.mean()), 6), "sd": round(float(column.std()), 6),
                         **{f"p{q}": round(float(np.percentile(column, q)), 6) for q in (5, 50, 95)}}
    return {"side": int(side), "photos": len(stats), "from": source, "names": list(names), "values": values,
            "summary": summary}


def build(*, model_id: str | None, artifact_sha256: str, counts: list[int], labels: list[int],
          embeddings: np.ndarray | None, stats: list[dict], stat_names: tuple[str, ...],
          side: int | None, seed: int, notes: list[str], statistics_from: str = "the test split") -> dict:
    """The whole baseline.json. `embeddings` None or `stats` empty: that part is missing, and
    `notes` says why (an artifact made before its serving code could give them)."""
    histogram = {str(label): 0 for label in labels}
    for count in counts:
        histogram[str(count)] = histogram.get(str(count), 0) + 1
    baseline = {
        "format": FORMAT,
        "model": {"model_id": model_id, "artifact_sha256": artifact_sha256},
        "made": {"by": "Evaluate", "from": "the test split",
                 "time": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
                 "photos": len(counts), "seed": seed},
        "predicted_counts": histogram,
        "embeddings": None,
        "image_statistics": None,
        "notes": list(notes),
    }
    if embeddings is not None and len(embeddings) >= 4:
        baseline["embeddings"] = embedding_summary(embeddings, seed)
    if stats and side:
        baseline["image_statistics"] = statistics_summary(stats, stat_names, side, seed, source=statistics_from)
    return baseline
