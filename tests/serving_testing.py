"""A real local endpoint in a subprocess, for tests and the serving benchmark.

The test binds and listens on 127.0.0.1 first, then hands the socket to the server process
(`python -m pipeline.serving.http_server ARTIFACT --fd N`): no port is picked, released and raced for,
and requests may be sent before the server has started (they wait in the listen backlog).
"""
from __future__ import annotations

import io
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
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


class ServerProcess:
    def __init__(self, artifact: Path, log_path: Path, env: dict[str, str] | None = None, **settings):
        self.artifact = artifact
        self.log_path = log_path
        self.settings = settings
        self.env = env or {}  # on top of this process's environment
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(256)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, wait_ready: bool = True, timeout: float = 120) -> "ServerProcess":
        args = [sys.executable, "-m", "pipeline.serving.http_server", str(self.artifact),
                "--fd", str(self.sock.fileno())]
        for name, value in self.settings.items():
            args += ["--" + name.replace("_", "-"), str(value)]
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", **self.env)
        self.log_file = open(self.log_path, "wb")
        self.process = subprocess.Popen(args, cwd=ROOT, env=env, pass_fds=[self.sock.fileno()],
                                        stdout=self.log_file, stderr=subprocess.STDOUT)
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, timeout=10) as client:
            while True:
                assert self.process.poll() is None, f"server exited:\n{self.log()}"
                if client.get("/ping").status_code == 200:
                    return
                assert time.monotonic() < deadline, f"server not ready:\n{self.log()}"
                time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def peak_rss_bytes(self) -> int:
        """The server's peak resident memory so far (VmHWM: the kernel's high-water mark)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmHWM in /proc")

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS in /proc")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.sock.close()
        if getattr(self, "log_file", None):
            self.log_file.close()

    def __enter__(self) -> "ServerProcess":
        return self if self.process is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def patched_artifact(make_artifact, dest: Path, code: str, **kwargs) -> Path:
    """A real artifact whose code/inference.py has `code` appended (to slow or observe it)."""
    make_artifact(dest, **kwargs)
    model_dir = dest / "model"
    inference = model_dir / "code" / "inference.py"
    inference.write_text(inference.read_text() + "\n\n" + code)
    tarball = dest / "patched.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        for item in sorted(model_dir.rglob("*")):
            tar.add(item, arcname=item.relative_to(model_dir).as_posix(), recursive=False)
    shutil.rmtree(model_dir)
    return tarball


def bin_photo(seed: int, size=(320, 240), fmt: str = "JPEG") -> bytes:
    """A generated photo (noise on a gradient): the core tests need no real data."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = np.linspace(0, 200, w, dtype=np.float32)[None, :, None].repeat(h, 0).repeat(3, 2)
    pixels = np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, fmt)
    return buffer.getvalue()
