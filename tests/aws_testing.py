"""Shared helpers for the SageMaker/AWS tests: fake AWS environments, moto, a network guard."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REGION = "us-east-1"
ROLE = "arn:aws:iam::123456789012:role/InvmonPipelineRole"
BUCKET = "invmon-test-artifacts"
COMMIT = "0123456789abcdef0123456789abcdef01234567"

def aws_env(endpoint_url: str | None = None, region: str | None = REGION) -> dict:
    """os.environ without real AWS settings, plus fake credentials (and a moto endpoint)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SAGEMAKER_"))}
    env.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
               AWS_SESSION_TOKEN="testing", AWS_EC2_METADATA_DISABLED="true",
               AWS_SHARED_CREDENTIALS_FILE="/dev/null", AWS_CONFIG_FILE="/dev/null",
               SAGEMAKER_VALIDATE_ROLE="false",  # moto does not simulate IAM policies
               INVMON_SDK_TELEMETRY="off")  # the SDK's telemetry is an HTTP request to AWS
    if region:
        env["AWS_DEFAULT_REGION"] = region
    if endpoint_url:
        env["AWS_ENDPOINT_URL"] = endpoint_url
    return env


@contextlib.contextmanager
def patched_environ(env: dict):
    """Replace os.environ with `env` for the block (AWS settings are read at client creation)."""
    old = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(old)


class NetworkGuard:
    """Refuses (and records) every socket connection that leaves this machine."""

    LOCAL = ("127.0.0.1", "::1", "localhost")

    def __init__(self):
        self.attempts: list[tuple[str, object]] = []

    def __enter__(self):
        self._connect = socket.socket.connect
        guard = self

        def connect(sock, address):
            host = address[0] if isinstance(address, tuple) else address
            if sock.family == socket.AF_UNIX or host in guard.LOCAL:
                return guard._connect(sock, address)
            guard.attempts.append((threading.current_thread().name, address))
            raise OSError(f"network disabled in this test (tried {address})")

        socket.socket.connect = connect
        return self

    def __exit__(self, *exc):
        socket.socket.connect = self._connect
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_server(reset: bool = True):
    """moto's ThreadedMotoServer on 127.0.0.1 and a port it bound itself; yields its endpoint URL.

    The server thread shares moto's in-process state (with mock_aws too): `reset` empties it
    first, for a test that needs to see exactly what its own commands created.
    """
    import urllib.request

    from moto.server import ThreadedMotoServer

    # Port 0: the server binds a free port itself and keeps it (no pick-then-release race).
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    port = server.get_host_and_port()[1]
    if reset:
        urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{port}/moto-api/reset", method="POST"), timeout=30).close()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def offline_build(staging: Path, role: str = ROLE, bucket: str = BUCKET, **kwargs) -> dict:
    """The definition built offline: no AWS settings at all, and no network."""
    from pipeline.sagemaker import definition as sp

    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    with patched_environ(env), NetworkGuard() as guard:
        pipeline = sp.get_pipeline(REGION, role, default_bucket=bucket, offline_dir=staging, **kwargs)
        text = sp.definition(pipeline)
    assert guard.attempts == [], f"offline build tried the network: {guard.attempts}"
    return json.loads(text)


@lru_cache(maxsize=1)
def default_offline_definition() -> str:
    """The default definition (offline), built once per test session; returns the JSON text."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="invmon-offline-") as tmp:
        return json.dumps(offline_build(Path(tmp)))


def all_steps(definition: dict) -> dict[str, dict]:
    """Every step by name, the ones inside condition branches included."""
    found: dict[str, dict] = {}

    def walk(steps):
        for step in steps:
            found[step["Name"]] = step
            if step["Type"] == "Condition":
                walk(step["Arguments"].get("IfSteps", []) + step["Arguments"].get("ElseSteps", []))

    walk(definition["Steps"])
    return found


def keep_customer_metadata(monkeypatch) -> None:
    """moto 5 replaces a model package's CustomerMetadataProperties with None on any
    UpdateModelPackage that does not name them (an approval, say); SageMaker keeps them and
    merges what an update names. Make moto do what SageMaker does."""
    from moto.sagemaker.models import SageMakerModelBackend

    update = SageMakerModelBackend.update_model_package

    def merging(self, model_package_arn, model_approval_status, approval_description,
                customer_metadata_properties, *args, **kwargs):
        kept = dict(self.describe_model_package(model_package_arn).customer_metadata_properties or {})
        kept.update(customer_metadata_properties or {})
        return update(self, model_package_arn, model_approval_status, approval_description,
                      kept or None, *args, **kwargs)

    monkeypatch.setattr(SageMakerModelBackend, "update_model_package", merging)
