"""--recall_floor: the rounded expected count (--decode mean) starves the end counts, so the kept
model's two end cuts are moved until count 1 and count 5 reach the floor on the validation split,
and the artifact serves with those cuts (model_config.json "cuts", inference.served_cuts)."""
from __future__ import annotations

import inference

from trainer.data import LABELS
from trainer.heads import scores
from trainer.report import TrainError


def floored(best: dict, floor: float, log) -> dict:
    """--recall_floor: the kept model's cuts (inference.floor_cuts) fitted on its validation
    outputs, and its validation metrics decoded with them (loss is unchanged: it is the decoding
    that moves). The metrics are then scored on the photos the cuts were fitted on; Evaluate's
    test split is the held-out measure."""
    if "outputs" not in best:  # a checkpoint written before train.py kept them
        raise TrainError("--recall_floor: the checkpoint's kept epoch holds no validation outputs to fit the cuts "
                         "on; train again without the checkpoint, or with --recall_floor 0")
    probabilities, targets = best["outputs"]
    cuts = inference.floor_cuts(probabilities, targets, floor)
    before = scores(inference.decode_counts(probabilities, "mean"), targets)
    after = scores(inference.decode_counts(probabilities, "mean", cuts), targets)
    count_cuts = [c + LABELS[0] for c in cuts]  # unrounded: float32 values, exact through JSON and back
    log(f"recall floor {floor:g}: cuts on the expected count {', '.join(f'{c:g}' for c in count_cuts)} "
        f"(count {LABELS[0]} recall {before['per_class'][0]:.3f} -> {after['per_class'][0]:.3f}, count {LABELS[-1]} "
        f"{before['per_class'][-1]:.3f} -> {after['per_class'][-1]:.3f}); validation accuracy "
        f"{before['accuracy']:.4f} -> {after['accuracy']:.4f}, rmse {before['rmse']:.4f} -> {after['rmse']:.4f}, "
        f"on the photos the cuts were fitted on")
    short = [LABELS[c] for c in (0, -1) if after["per_class"][c] < floor]  # nan (no such photo) is not short
    if short:
        log(f"recall floor {floor:g}: count {' and '.join(map(str, short))} stays under it; a cut moves at most "
            f"half a count, not into its neighbour")
    metrics = {**best["metrics"], "accuracy": after["accuracy"], "rmse": after["rmse"]}
    return {**best, "accuracy": after["accuracy"], "metrics": metrics, "cuts": count_cuts}

