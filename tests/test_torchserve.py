"""The artifact served by AWS's own serving stack (the SageMaker PyTorch inference toolkit on
TorchServe, as the container runs it: tests/torchserve_testing.py) answers as the local endpoint
does: the same bodies for photos, the same 4xx codes for bad requests and hostile payloads, and
never a 5xx or a traceback.

A freshly trained artifact of the `real` profile's recipe (EfficientNet-Lite0 with two tails on a
shared front: the one that did not load in the issue's report) is served by both servers at once,
and every request goes to both. TorchServe's frontend is Java: without a Java runtime these
tests are skipped, saying so (.ci/run installs Debian's default-jre-headless).
"""
from __future__ import annotations

import subprocess
import time
from collections import Counter

import httpx
import pytest
from hypothesis import HealthCheck, given, settings

from profile_artifacts import profile_artifact
from serving_testing import ServerProcess, bin_photo
from test_serving_fuzz import catalogue, payloads
from torchserve_testing import TorchServeProcess, java, toolkit_python

pytestmark = [pytest.mark.torchserve,
              pytest.mark.skipif(java() is None, reason="no Java runtime: TorchServe's frontend needs one "
                                 "(apt-get install default-jre-headless; .ci/run does)")]
pytest.importorskip("efficientnet_lite_pytorch")
JSON = "application/json"


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    started = time.monotonic()
    artifact = profile_artifact("real", tmp_path_factory)
    trained = time.monotonic() - started
    python, built = toolkit_python()
    workdir = tmp_path_factory.mktemp("torchserve")
    torchserve = TorchServeProcess(python, artifact, workdir)
    local = ServerProcess(artifact, workdir / "local.log", env={"OMP_NUM_THREADS": "1"})  # as TorchServe's
    try:
        torchserve.start()
        local.start(wait_ready=False)
        ready = torchserve.wait_ready()
        local.wait_ready()
        print(f"\ntorchserve: artifact trained in {trained:.1f} s, toolkit env built in {built:.1f} s "
              f"(0: it was there), TorchServe ready {ready:.1f} s after start")
        with httpx.Client(base_url=torchserve.url, timeout=120) as ts, \
                httpx.Client(base_url=local.url, timeout=120) as lo:
            yield torchserve, ts, lo
    finally:
        torchserve.stop()
        local.stop()


def both(servers, body: bytes, headers: dict) -> tuple[httpx.Response, httpx.Response]:
    """The same request to TorchServe and to the local endpoint."""
    _, ts, lo = servers
    return ts.post("/invocations", content=body, headers=headers), lo.post("/invocations", content=body, headers=headers)


def check_refusal(ts_answer: httpx.Response, local_answer: httpx.Response, what: str) -> int:
    """Both refuse with the same 4xx; TorchServe's answer is a JSON error without a traceback."""
    assert 400 <= local_answer.status_code < 500, (what, local_answer.status_code, local_answer.text)
    assert ts_answer.status_code == local_answer.status_code, (what, ts_answer.status_code, ts_answer.text[:2000])
    assert ts_answer.headers["content-type"].startswith(JSON), (what, ts_answer.headers)
    assert ts_answer.json()["error"], (what, ts_answer.text)
    assert "Traceback" not in ts_answer.text and 'File "' not in ts_answer.text, (what, ts_answer.text)
    return ts_answer.status_code


def test_the_toolkit_serves_on_loopback_only(servers):
    torchserve, ts, _ = servers
    assert ts.get("/ping").status_code == 200
    config = (torchserve.workdir / "sagemaker-ts.properties").read_text()
    assert "default_service_handler=" in config and "sagemaker_pytorch_serving_container" in config
    # The toolkit's own config says 0.0.0.0; TorchServe's log says where it really listens.
    log = torchserve.log()
    assert f"Inference API bind to: http://127.0.0.1:{torchserve.port}" in log
    assert "0.0.0.0" not in "\n".join(line for line in log.splitlines() if "bind to:" in line)
    assert "requirements.txt" not in log  # nothing was pip installed at start
    # The toolkit's environment has no efficientnet_lite_pytorch: the artifact's own copy serves.
    probe = subprocess.run([str(torchserve.python), "-c", "import importlib.util as u; "
                            "print(u.find_spec('efficientnet_lite_pytorch'), u.find_spec('torch') is not None)"],
                           capture_output=True, text=True, cwd=torchserve.workdir)
    assert probe.stdout.split() == ["None", "True"], probe.stdout + probe.stderr


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_generated_photos_get_the_local_endpoints_answer(servers, fmt):
    content_type = "image/jpeg" if fmt == "JPEG" else "image/png"
    for seed in range(4):
        body = bin_photo(seed, (320 - 40 * seed, 240), fmt)
        ts_answer, local_answer = both(servers, body, {"Content-Type": content_type, "Accept": JSON})
        assert local_answer.status_code == ts_answer.status_code == 200, ts_answer.text[:2000]
        assert ts_answer.headers["content-type"].startswith(JSON)
        assert ts_answer.content == local_answer.content  # byte for byte
        assert ts_answer.json()["model_version"] == "real-tiny"


def test_real_photos_get_the_local_endpoints_answer(servers, abid_sample):
    photos = [p for count in range(1, 6) for p in sorted((abid_sample / str(count)).glob("*.jpg"))[:2]]
    for photo in photos:
        ts_answer, local_answer = both(servers, photo.read_bytes(), {"Content-Type": "image/jpeg"})
        assert local_answer.status_code == ts_answer.status_code == 200, (photo, ts_answer.text[:2000])
        assert ts_answer.content == local_answer.content, photo


def bad_requests() -> list[tuple[str, bytes, dict, int]]:
    jpeg = bin_photo(1)
    rng_bytes = bytes((i * 7919 + 13) % 256 for i in range(5000))
    return [
        # The three of the issue's report, each a 500 with a traceback before.
        ("random bytes as a JPEG", b"\xff\xd8\xff\xe0" + rng_bytes, {"Content-Type": "image/jpeg"}, 400),
        ("a text/plain body", b"three items, trust me", {"Content-Type": "text/plain"}, 415),
        ("Accept: text/csv", jpeg, {"Content-Type": "image/jpeg", "Accept": "text/csv"}, 406),
        ("empty body", b"", {"Content-Type": "image/jpeg"}, 400),
        ("no Content-Type", jpeg, {}, 415),
        ("a PNG sent as image/jpeg", bin_photo(2, fmt="PNG"), {"Content-Type": "image/jpeg"}, 400),
        ("truncated JPEG", jpeg[: len(jpeg) // 2], {"Content-Type": "image/jpeg"}, 400),
        ("JSON body", b'{"count": 3}', {"Content-Type": "application/json"}, 415),
        ("image/gif", jpeg, {"Content-Type": "image/gif"}, 415),
        ("JSON refused by q=0", jpeg, {"Content-Type": "image/jpeg", "Accept": "application/json;q=0, text/csv"}, 406),
        ("bad type and bad Accept", b"x", {"Content-Type": "text/plain", "Accept": "text/csv"}, 415),
    ]


@pytest.mark.parametrize("name,body,headers,status", bad_requests(), ids=[r[0] for r in bad_requests()])
def test_bad_requests_get_the_same_4xx_without_a_traceback(servers, name, body, headers, status):
    ts_answer, local_answer = both(servers, body, headers)
    assert local_answer.status_code == status, local_answer.text
    check_refusal(ts_answer, local_answer, name)


@pytest.mark.parametrize("accept", ["application/json", "*/*", "application/*", "text/csv, application/json;q=0.5",
                                    "application/json; charset=utf-8"])
def test_accept_headers_that_admit_json_are_answered_alike(servers, accept):
    ts_answer, local_answer = both(servers, bin_photo(3), {"Content-Type": "image/jpeg", "Accept": accept})
    assert local_answer.status_code == ts_answer.status_code == 200, ts_answer.text[:2000]
    assert ts_answer.content == local_answer.content


def test_a_round_of_the_fuzz_payloads_gets_the_same_codes(servers):
    """The local fuzz test's catalogue (bombs in every accepted format, every Pillow format under
    each image type, truncations, 16-megapixel photos, odd content types) and 150 of its
    generated payloads, to both servers: the same status every time, never a 5xx."""
    statuses: Counter = Counter()

    def send(body: bytes, content_type: str | None, what: str) -> None:
        headers = {} if content_type is None else {"Content-Type": content_type}
        ts_answer, local_answer = both(servers, body, headers)
        assert local_answer.status_code < 500 and ts_answer.status_code < 500, (what, ts_answer.text[:2000])
        if local_answer.status_code == 200:
            assert ts_answer.status_code == 200 and ts_answer.content == local_answer.content, what
        else:
            check_refusal(ts_answer, local_answer, what)
        statuses[ts_answer.status_code] += 1

    for name, body, content_type in catalogue():
        send(body, content_type, f"{name} as {content_type}")

    @settings(max_examples=150, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(payloads())
    def one(payload):
        send(*payload, f"generated {payload[1]!r} {payload[0][:16]!r}")

    one()
    print(f"\ntorchserve fuzz round: {sum(statuses.values())} payloads, statuses {dict(statuses)}")
    assert {200, 400, 415} <= set(statuses)
    torchserve, ts, _ = servers
    assert ts.get("/ping").status_code == 200
    assert "Traceback" not in torchserve.model_log()  # a refused request is not an error of the model
