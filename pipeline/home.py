"""Where the local back-ends keep their state: runs, registry, step environments, caches."""
from __future__ import annotations

import os
from pathlib import Path


def invmon_home() -> Path:
    """$INVMON_HOME, or .invmon in the current directory (the project root for `make run`)."""
    return Path(os.environ.get("INVMON_HOME", ".invmon")).resolve()


def step_envs(home: Path | None = None) -> Path:
    """$INVMON_ENVS, or envs/ in the home: the step environments (pipeline/local/envs.py). They are
    keyed by requirements file and interpreter and built atomically, so several homes can share one
    folder of them and build each once."""
    given = os.environ.get("INVMON_ENVS", "").strip()
    return Path(given).resolve() if given else (home or invmon_home()) / "envs"
