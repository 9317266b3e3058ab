"""What the job tells the world: lines on stdout, and a failure as one line (TrainError) that
SageMaker shows as the job's FailureReason."""
from __future__ import annotations

import os
import sys
from pathlib import Path

PROGRESS_SECONDS = 30  # a progress line at most this often inside a long pass


class TrainError(Exception):
    """A problem with the job's inputs: reported as one line, without a traceback."""


def say(line: str) -> None:
    """One line to stdout in one write: with PYTHONUNBUFFERED, print() writes its newline apart,
    and a forked tail's line (--tails) could land between the two on the shared pipe."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def write_failure(message: str) -> None:
    """SageMaker shows /opt/ml/output/failure as the job's FailureReason."""
    out = os.environ.get("SM_OUTPUT_DIR")
    if out and Path(out).is_dir():
        (Path(out) / "failure").write_text(message + "\n")
