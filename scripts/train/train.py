"""Train the bin-count model (items 1-5 in a warehouse bin photo) under the SageMaker contract.

    SM_CHANNEL_TRAIN=... SM_CHANNEL_VALIDATION=... SM_MODEL_DIR=... \\
        python train.py --arch resnet18 --image_size 96 --epochs 8 --lr 0.05 --batch_size 64

Inputs: hyperparameters as `--name value` arguments; the train and validation channels hold
`<count>/<id>.jpg` class folders (counts 1-5) as scripts/preprocess writes them.
Outputs, in SM_MODEL_DIR (SageMaker or the local runner tars it into model.tar.gz):
    model.pth            state_dict of the kept epoch (--keep_epoch; weights_only loadable); with
                         --tails, of every tail's on their shared front (inference.SharedFront)
    model_config.json    arch, labels, image settings, model id, hyperparameters, metrics
    code/inference.py    the serving functions this model is loaded through
and SM_OUTPUT_DATA_DIR/history.json with every epoch's metrics (with --tails, each tail's epochs
in turn, each entry marked with its `member`).

Every epoch prints one `name=value` line that SageMaker's (and the local tuner's) metric regexes
read; the last line repeats the best epoch's validation metrics, which are those of the saved
model. A checkpoint is written each epoch and a restarted job resumes from it.

The job itself is the trainer package beside this file (trainer/__init__.py lists its modules).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("inference") is None:
    # Run from a repo checkout by a Python without the step folders on its path (a step
    # environment): the serving module lives in scripts/inference. The containers stage it here.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "inference"))

from trainer.args import parse_args  # noqa: E402  (needs inference)
from trainer.job import run  # noqa: E402
from trainer.report import TrainError, write_failure  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except TrainError as exc:
        print(f"train.py: error: {exc}", file=sys.stderr, flush=True)
        write_failure(str(exc))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
