"""Waiting in tests for what a process does: poll a condition, never sleep a guessed time."""
from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float = 60, what: str | Callable[[], str] = "") -> T:
    """Poll `predicate` until it returns something truthy, and return that. `what` names what is
    awaited: text, or a function that describes it when the wait fails (say, with the last log)."""
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if got:
            return got
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")
        time.sleep(0.02)
