"""AWS's own PyTorch serving stack, run here as the SageMaker container runs it.

The container starts `sagemaker_pytorch_serving_container.serving.main()` (the
`sagemaker-pytorch-inference` toolkit), which writes TorchServe's config and starts TorchServe
(a Java frontend, Python workers running the toolkit's handler, which imports the artifact's
code/inference.py). Here the same `main()` runs from a virtual environment of its own
(build/torchserve-env, git-ignored): the toolkit, TorchServe and what they need from PyPI, and
for torch, torchvision, Pillow and numpy a .pth line to links to the project's own copies (the
serving image's four packages, tests/serving_image.py), so no second torch is installed and
nothing else of the project's environment is visible.

Differences from the container, all of place and none of behaviour:
- /opt/ml/model is a temporary folder: SAGEMAKER_BASE_DIR, the toolkit's own knob.
- TorchServe listens on 127.0.0.1 only, on free ports: TS_INFERENCE_ADDRESS and the other
  TS_* addresses (TorchServe reads them because the toolkit's config enables environment
  overrides) replace the toolkit's 0.0.0.0:8080.
- The toolkit writes its TorchServe config to /etc/sagemaker-ts.properties (a constant); here it
  goes to the work folder (the module attribute is set before main() runs).
- The toolkit refuses to start beside another TorchServe on the machine, so the runs of these
  tests take a machine-wide lock.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx

from conftest import install_command, locked
from serving_image import link_serving_image

ROOT = Path(__file__).resolve().parent.parent
ENV_DIR = ROOT / "build" / "torchserve-env"
# The versions of the report: the toolkit's latest release and the TorchServe it was
# tested with. TorchServe's wheel does not declare PyYAML, which its worker imports (the AWS
# images install it); the toolkit still imports pkg_resources (setuptools before 81).
TOOLKIT = ("sagemaker-pytorch-inference==2.0.25", "sagemaker-inference==1.10.1", "torchserve==0.12.0",
           "torch-model-archiver==0.12.0", "pyyaml>=6", "setuptools>=65,<81")
MACHINE_LOCK = Path("/tmp/invmon-torchserve.lock")
LAUNCH = """
import os
from sagemaker_pytorch_serving_container import serving, torchserve
torchserve.TS_CONFIG_FILE = os.path.join(os.getcwd(), "sagemaker-ts.properties")  # not /etc
serving.main()
"""


def java() -> str | None:
    """The java TorchServe's frontend would run on, if any."""
    found = shutil.which("java")
    if not found:
        return None
    try:
        done = subprocess.run([found, "-version"], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return found if done.returncode == 0 else None


def toolkit_python() -> tuple[Path, float]:
    """The toolkit environment's python, built once (and again when TOOLKIT or the project's
    torch changes); returns it and the seconds spent building (0 when it was there)."""
    import torch

    stamp_text = json.dumps([TOOLKIT, sys.version, torch.__version__, sys.executable])
    stamp = hashlib.sha256(stamp_text.encode()).hexdigest()[:16]
    python = ENV_DIR / "venv" / "bin" / "python"
    with locked(ENV_DIR.parent / "torchserve-env.lock"):
        if (ENV_DIR / "stamp").is_file() and (ENV_DIR / "stamp").read_text() == stamp and python.exists():
            return python, 0.0
        started = time.monotonic()
        shutil.rmtree(ENV_DIR, ignore_errors=True)
        image = link_serving_image(ENV_DIR / "serving-image")
        subprocess.run([sys.executable, "-m", "venv", str(ENV_DIR / "venv")], check=True,
                       capture_output=True)
        site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                   check=True, capture_output=True, text=True).stdout.strip())
        (site / "serving-image.pth").write_text(f"{image}\n")
        done = subprocess.run([*install_command(python), *TOOLKIT], capture_output=True, text=True)  # uv: 8 s, pip 14
        if done.returncode != 0:
            raise RuntimeError(f"installing the serving toolkit failed:\n{done.stdout}\n{done.stderr}")
        (ENV_DIR / "stamp").write_text(stamp)
        return python, time.monotonic() - started


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TorchServeProcess:
    """serving.main() on an artifact, in its own process group (so that it all stops together)."""

    def __init__(self, python: Path, artifact: Path, workdir: Path, workers: int = 1):
        self.python, self.artifact, self.workdir, self.workers = python, artifact, workdir, workers
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self._lock = None

    def environment(self) -> dict[str, str]:
        port, local = self.port, "http://127.0.0.1"
        worker_port = free_port()
        while any(Path(f"/tmp/.ts.sock.{worker_port + i}").exists() for i in range(4)):
            worker_port = free_port()  # TorchServe's workers listen on /tmp/.ts.sock.<port>
        bin_dirs = [str(self.python.parent), str(Path(java()).resolve().parent), "/usr/bin", "/bin"]
        return {
            "PATH": os.pathsep.join(bin_dirs), "HOME": str(self.workdir), "LANG": "C.UTF-8",
            # What the SageMaker Model sets (pipeline/sagemaker/definition.py, pipeline/registry/sagemaker_target.py).
            "SAGEMAKER_PROGRAM": "inference.py", "SAGEMAKER_SUBMIT_DIRECTORY": "/opt/ml/model/code",
            "SAGEMAKER_CONTAINER_LOG_LEVEL": "20", "SAGEMAKER_REGION": "us-east-1",
            # The toolkit's knobs: where /opt/ml is, the port, the number of workers.
            "SAGEMAKER_BASE_DIR": str(self.workdir / "ml"), "SAGEMAKER_BIND_TO_PORT": str(port),
            "SAGEMAKER_MODEL_SERVER_WORKERS": str(self.workers),
            # TorchServe's own: every listener on 127.0.0.1, on ports of its own.
            "TS_INFERENCE_ADDRESS": f"{local}:{port}", "TS_MANAGEMENT_ADDRESS": f"{local}:{port}",
            "TS_METRICS_ADDRESS": f"{local}:{free_port()}",
            "TS_GRPC_INFERENCE_ADDRESS": "127.0.0.1", "TS_GRPC_INFERENCE_PORT": str(free_port()),
            "TS_GRPC_MANAGEMENT_ADDRESS": "127.0.0.1", "TS_GRPC_MANAGEMENT_PORT": str(free_port()),
            "TS_INITIAL_WORKER_PORT": str(worker_port),
            # One thread, as the local endpoint the answers are compared with byte for byte: another
            # thread count sums in another order.
            "OMP_NUM_THREADS": "1",
        }

    def start(self) -> "TorchServeProcess":
        self._lock = open(MACHINE_LOCK, "a")
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        model_dir = self.workdir / "ml" / "model"  # /opt/ml/model, as SageMaker extracts it
        model_dir.mkdir(parents=True)
        with tarfile.open(self.artifact) as tar:
            tar.extractall(model_dir, filter="data")
        self.log_file = open(self.workdir / "serving.log", "wb")
        self.process = subprocess.Popen([str(self.python), "-c", LAUNCH], cwd=self.workdir,
                                        env=self.environment(), stdout=self.log_file,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def ping(self) -> httpx.Response | None:
        try:
            return httpx.get(f"{self.url}/ping", timeout=5)
        except httpx.HTTPError:
            return None

    def workers_ready(self) -> bool:
        """TorchServe's management API (on the same port, as in the container): every worker of
        the model READY, i.e. model_fn has returned in each."""
        try:
            described = httpx.get(f"{self.url}/models/model", timeout=5).json()
        except (httpx.HTTPError, ValueError):
            return False
        workers = described[0].get("workers", []) if isinstance(described, list) and described else []
        return len(workers) >= self.workers and all(w.get("status") == "READY" for w in workers)

    def wait_ready(self, timeout: float = 180) -> float:
        """Seconds until every worker has loaded the model."""
        started = time.monotonic()
        while not self.workers_ready():
            assert self.process.poll() is None, f"serving.main() exited:\n{self.log()}"
            assert time.monotonic() - started < timeout, f"TorchServe not ready in {timeout} s:\n{self.log()}"
            time.sleep(0.5)
        return time.monotonic() - started

    def log(self) -> str:
        text = (self.workdir / "serving.log").read_text(errors="replace")
        for name in ("ts_log.log", "model_log.log"):
            path = self.workdir / "logs" / name
            if path.is_file():
                text += f"\n--- logs/{name} (end)\n" + path.read_text(errors="replace")[-6000:]
        return text[-20000:]

    def model_log(self) -> str:
        path = self.workdir / "logs" / "model_log.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def stop(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)  # the toolkit passes it on to TorchServe
                try:
                    self.process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pass
            try:  # whatever of this process group is left (TorchServe, its workers)
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait()
            self.log_file.close()
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None
