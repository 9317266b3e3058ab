"""A step script's main() run in the test process, its output captured as subprocess.run captures
a process's: the same code, without a process start and a torch import per call. Each script keeps
at least one test that runs it as its container does (a process: exit status, no traceback); an
exception that escapes main() here fails the calling test, as a traceback would."""
from __future__ import annotations

import contextlib
import io
import subprocess
from typing import Callable


def run_main(main: Callable[[list[str]], int], *args, check: bool = False) -> subprocess.CompletedProcess:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main([str(a) for a in args])
        except SystemExit as exc:  # argparse's refusals
            status = exc.code
    done = subprocess.CompletedProcess([str(a) for a in args], status, out.getvalue(), err.getvalue())
    if check:
        assert status == 0, done.stderr[-3000:]
    return done
