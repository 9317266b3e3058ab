"""How the local server's threads share the machine's cores: the forward pass, the decoding, OpenMP.

The cores are counted as the kernel enforces them (the CPU affinity, and a cgroup v2 CPU quota
as a container sets one), not as the host has them: torch would otherwise start one intra-op
thread per core it can see.

- torch's intra-op threads: every core. The forward pass is most of the work (EfficientNet-Lite0
  at 160 px: about 16 ms of CPU per photo, against 3 ms to decode a photo of the ABID sample),
  it is what a lone request waits for, and a batch splits across cores. (A single image of this
  small network gains little from a second thread on a busy shared machine, docs/benchmarks.md;
  on cores of its own the forward pass should have them all. --torch-threads sets it.)
- decode threads: one per 4 cores, at least one. They run beside the forward pass of the batch
  before theirs, each taking a core from torch's team while it works; decoding is about a sixth
  of the CPU a photo costs, so a quarter of the cores keeps up with room to spare. On 2 cores,
  one decode thread and two did not differ measurably; one takes less from the forward pass.
- OpenMP waits passively. libgomp's default has an idle thread spin (about 6 ms of CPU after
  each parallel region here); on cores shared with the decode thread, the event loop and other
  processes, spinning threads take the cores the others need, and a forward pass waits at every
  barrier for a team thread that was preempted. Served spinning, a lone request waited several
  times longer and 16 clients got a fraction of the requests (docs/benchmarks.md, Serving).
  Training and Evaluate wait passively for the same reason (trainer/__init__.py). It must be set
  before OpenMP loads with torch; an OMP_WAIT_POLICY already set is left as it is.
"""
from __future__ import annotations

import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("invmon.endpoint")


def available_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


@dataclass(frozen=True)
class ThreadPlan:
    cores: int
    torch_threads: int
    decode_workers: int


def plan(torch_threads: int = 0, decode_workers: int = 0, cores: int | None = None) -> ThreadPlan:
    """The split for this machine; a setting above 0 is taken as it is, and so is an
    OMP_NUM_THREADS in the environment for torch's threads."""
    cores = cores or available_cores()
    if torch_threads <= 0:
        given = os.environ.get("OMP_NUM_THREADS", "").strip()
        torch_threads = int(given) if given.isdigit() and int(given) > 0 else cores
    return ThreadPlan(cores, torch_threads, decode_workers if decode_workers > 0 else max(1, cores // 4))


def passive_openmp_waits() -> None:
    """OMP_WAIT_POLICY=PASSIVE unless set, before torch (and its OpenMP) is imported."""
    if "OMP_WAIT_POLICY" in os.environ:
        return
    if "torch" in sys.modules:
        log.warning("torch was imported before the server started: its OpenMP threads spin while "
                    "idle; set OMP_WAIT_POLICY=PASSIVE before starting it")
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def use_torch_threads(count: int) -> None:
    """In the thread that runs the forward passes (its initializer): torch's intra-op threads."""
    try:
        import torch
    except ImportError:  # an artifact served without torch: nothing to size
        return
    torch.set_num_threads(count)
