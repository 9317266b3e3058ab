"""Where the local back-ends keep their state: runs, registry, step environments, caches."""
from __future__ import annotations

import os
from pathlib import Path


def invmon_home() -> Path:
    """$INVMON_HOME, or .invmon in the current directory (the project root for `make run`)."""
    return Path(os.environ.get("INVMON_HOME", ".invmon")).resolve()
