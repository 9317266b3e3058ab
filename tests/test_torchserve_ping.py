"""A model that cannot load: both servers say so, in one line that names what is missing, and
neither keeps saying it is healthy.

TorchServe answers /ping from its workers' state: 200 "Healthy" while a worker is still being
retried, 500 "Unhealthy" once one has failed for the model's maxRetryTimeoutInSec (300 s by
default: the 200s the issue's report saw). The artifact's MAR-INF/model-config.yaml sets 30 s.
The local server stops (exit status 1) when its model fails to load.
"""
from __future__ import annotations

import io
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from profile_artifacts import profile_artifact
from serving_testing import ServerProcess
from torchserve_testing import TorchServeProcess, java, toolkit_python

pytest.importorskip("efficientnet_lite_pytorch")


def without(tarball: Path, dest: Path, prefix: str) -> Path:
    """A copy of model.tar.gz without the members whose name starts with `prefix`."""
    with tarfile.open(tarball) as src, tarfile.open(dest, "w:gz") as dst:
        for member in src.getmembers():
            if not member.name.startswith(prefix):
                dst.addfile(member, io.BytesIO(src.extractfile(member).read()) if member.isfile() else None)
    return dest


@pytest.mark.torchserve
@pytest.mark.skipif(java() is None, reason="no Java runtime: TorchServe's frontend needs one "
                    "(apt-get install default-jre-headless; .ci/run does)")
def test_torchserve_ping_turns_unhealthy_when_the_architecture_is_missing(tmp_path, tmp_path_factory):
    """The issue's artifact: no efficientnet_lite_pytorch anywhere the worker can import from."""
    artifact = without(profile_artifact("real", tmp_path_factory), tmp_path / "model.tar.gz",
                       "code/efficientnet_lite_pytorch")
    python, _ = toolkit_python()
    server = TorchServeProcess(python, artifact, tmp_path / "ts").start()
    try:
        started, pings = time.monotonic(), []
        while True:
            answer = server.ping()
            pings.append(answer.status_code if answer is not None else None)
            if answer is not None and answer.status_code == 500:
                break
            assert server.process.poll() is None, server.log()
            assert time.monotonic() - started < 150, f"/ping never turned unhealthy: {pings}\n{server.log()}"
            time.sleep(1)
        unhealthy_after = time.monotonic() - started
        assert answer.json()["status"] == "Unhealthy"
        assert not server.workers_ready()
        log = server.model_log()
    finally:
        server.stop()
    print(f"\ntorchserve: /ping 500 Unhealthy {unhealthy_after:.0f} s after start (TorchServe's default: 300 s)")
    lines = [line for line in log.splitlines() if "model_fn: cannot load the model in" in line]
    assert lines, log[-5000:]
    assert all("arch efficientnet_lite0 needs the efficientnet_lite_pytorch package, which is neither in "
               "the artifact" in line and "pip install efficientnet-lite-pytorch" in line for line in lines)


@pytest.mark.slow
def test_local_server_stops_when_the_weights_are_missing(tmp_path, tiny_artifact):
    artifact = without(tiny_artifact, tmp_path / "model.tar.gz", "model.pth")
    server = ServerProcess(artifact, tmp_path / "server.log").start(wait_ready=False)
    try:
        assert server.process.wait(timeout=120) == 1
    except subprocess.TimeoutExpired:
        pytest.fail(f"the server kept running:\n{server.log()}")
    finally:
        server.stop()
    log = server.log()
    assert "Traceback" not in log
    (line,) = [line for line in log.splitlines() if "cannot serve:" in line]
    assert "the artifact has no model.pth" in line
