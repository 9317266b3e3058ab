"""The local server under load and slow or vanishing clients: a real uvicorn process.

Each test runs `python -m pipeline.serving.http_server` on a socket the test bound, with a real model
artifact; where a test must hold the forward pass, the artifact's predict_fn waits for a file
(and logs each call's batch size), so the timing is the test's, not the machine's.
"""
from __future__ import annotations

import json
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import make_artifact
from pipeline.serving.threads import available_cores, plan
from serving_testing import ServerProcess, bin_photo, patched_artifact
from waiting import wait_for

JPEG = {"Content-Type": "image/jpeg"}

HELD_PREDICT = """
import json as _json, pathlib as _pathlib, time as _time
_predict_fn = predict_fn
_HOLD = _pathlib.Path({hold!r})
_CALLS = _pathlib.Path({calls!r})


def predict_fn(data, model):
    with _CALLS.open("a") as calls:
        calls.write(_json.dumps(len(data) if isinstance(data, list) else 0) + "\\n")
    deadline = _time.monotonic() + 60
    while _HOLD.exists() and _time.monotonic() < deadline:
        _time.sleep(0.01)
    return _predict_fn(data, model)
"""

SLOW_LOAD = """
import pathlib as _pathlib, time as _time
_model_fn = model_fn


def model_fn(model_dir):
    deadline = _time.monotonic() + 60
    while _pathlib.Path({hold!r}).exists() and _time.monotonic() < deadline:
        _time.sleep(0.01)
    return _model_fn(model_dir)
"""


THREADS_SEEN = """
import json as _json, os as _os, threading as _threading
_predict_fn_seen = predict_fn


def predict_fn(data, model):
    with open({seen!r}, "a") as seen:
        seen.write(_json.dumps({{"omp": _os.environ.get("OMP_WAIT_POLICY"),
                                 "torch_threads": torch.get_num_threads(),
                                 "thread": _threading.current_thread().name}}) + "\\n")
    return _predict_fn_seen(data, model)
"""


class Held:
    """An artifact whose predict_fn is held while `hold` exists; `calls()` = batch sizes."""

    def __init__(self, tmp_path):
        self.hold = tmp_path / "hold"
        self.calls_file = tmp_path / "calls.jsonl"
        self.artifact = patched_artifact(make_artifact, tmp_path / "held", HELD_PREDICT.format(
            hold=str(self.hold), calls=str(self.calls_file)))

    def calls(self) -> list[int]:
        if not self.calls_file.exists():
            return []
        return [json.loads(line) for line in self.calls_file.read_text().split()]

    def wait_calls(self, n: int) -> list[int]:
        wait_for(lambda: len(self.calls()) >= n, 30, lambda: f"{n} predict_fn calls: {self.calls()}")
        return self.calls()


def wait_load(http: httpx.Client, **want: int) -> dict:
    """/ping once its load figures are `want` (e.g. queued=8)."""
    pings = []

    def reached() -> dict | None:
        pings.append(http.get("/ping").json())
        return pings[-1] if all(pings[-1].get(k) == v for k, v in want.items()) else None

    return wait_for(reached, 30, lambda: f"/ping to say {want}; it said {pings[-1]}")


def wait_log(server, text: str, timeout: float = 30) -> None:
    wait_for(lambda: text in server.log(), timeout, lambda: f"{text!r} in the log:\n{server.log()}")


def access_lines(log: str, path: str = "/invocations") -> list[str]:
    return [line for line in log.splitlines() if f'"POST {path}"' in line or f'"GET {path}"' in line]


@pytest.mark.slow
def test_ping_is_503_until_the_model_is_loaded(tmp_path):
    hold = tmp_path / "hold-load"
    hold.touch()
    artifact = patched_artifact(make_artifact, tmp_path / "slow", SLOW_LOAD.format(hold=str(hold)))
    with ServerProcess(artifact, tmp_path / "server.log").start(wait_ready=False) as server, \
            httpx.Client(base_url=server.url, timeout=30) as http:
        ping = http.get("/ping")  # the socket is listening from the start; the model is not
        assert ping.status_code == 503 and ping.json()["status"] == "loading"
        assert ping.headers["retry-after"] == "1"
        early = http.post("/invocations", content=bin_photo(0), headers=JPEG)
        assert early.status_code == 503 and "loading" in early.json()["error"]
        assert early.headers["retry-after"] == "1"
        hold.unlink()
        server.wait_ready(60)
        assert http.get("/ping").json()["status"] == "ok"
        assert http.post("/invocations", content=bin_photo(0), headers=JPEG).status_code == 200


def test_a_model_that_fails_to_load_stops_the_server(tmp_path):
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(b"not a tarball")
    server = ServerProcess(broken, tmp_path / "server.log").start(wait_ready=False)
    try:
        assert server.process.wait(timeout=60) == 1
        assert "not a readable model.tar.gz" in server.log()
        assert "Traceback" not in server.log()
    finally:
        server.stop()


@pytest.mark.slow
def test_concurrent_requests_share_one_forward_pass(tmp_path):
    held = Held(tmp_path)
    photos = [bin_photo(i) for i in range(9)]
    with ServerProcess(held.artifact, tmp_path / "server.log", max_batch=16) as server, \
            httpx.Client(base_url=server.url, timeout=60,
                         limits=httpx.Limits(max_connections=16)) as http:
        alone = [http.post("/invocations", content=p, headers=JPEG).json() for p in photos]
        assert held.calls() == [1] * 9  # one client at a time: batches of one, no waiting
        held.hold.touch()  # the next forward pass is held, so the other requests pile up
        with ThreadPoolExecutor(9) as pool:
            first = pool.submit(http.post, "/invocations", content=photos[0], headers=JPEG)
            held.wait_calls(10)
            rest = [pool.submit(http.post, "/invocations", content=p, headers=JPEG)
                    for p in photos[1:]]
            # All eight are decoded and queued behind the held batch; /ping says so.
            assert wait_load(http, queued=8)["in_flight"] == 9
            held.hold.unlink()
            answers = [f.result() for f in [first] + rest]
        assert [r.status_code for r in answers] == [200] * 9
        # The eight that waited went through predict_fn as one list: one forward pass.
        assert held.calls()[9:] == [1, 8]
        # Same answer batched as alone (a batch is scored as its images one by one would be).
        for together, single in zip(answers, alone):
            got = together.json()
            assert got["count"] == single["count"]
            assert got["probabilities"] == pytest.approx(single["probabilities"], abs=1e-4)
    # Each lone request (the nine in turn, then the held one) went straight to the forward
    # pass; the eight behind the held one went as one batch once nobody else was on the way.
    assert ("scored 18 images in 11 forward passes (mean batch 1.6; "
            "dispatched: 10 lone request, 1 nobody on the way)") in server.log()


@pytest.mark.slow
def test_threads_are_sized_for_the_machine_and_openmp_waits_passively(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)  # as a user's shell has it
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    seen = tmp_path / "seen.jsonl"
    artifact = patched_artifact(make_artifact, tmp_path / "seen", THREADS_SEEN.format(seen=str(seen)))
    cores = available_cores()
    logs = []
    for name, settings in (("auto", {}), ("set", {"torch_threads": 1, "decode_workers": 3})):
        with ServerProcess(artifact, tmp_path / f"{name}.log", **settings) as server, \
                httpx.Client(base_url=server.url, timeout=60) as http:
            assert http.post("/invocations", content=bin_photo(1), headers=JPEG).status_code == 200
            logs.append(server.log())
    auto, chosen = [json.loads(line) for line in seen.read_text().splitlines()]
    # Set by the server before torch loaded: OpenMP's idle threads do not spin.
    assert auto["omp"] == "PASSIVE" and auto["thread"].startswith("invmon-predict")
    assert auto["torch_threads"] == cores
    decode = max(1, cores // 4)
    assert f"{cores} cores: {cores} torch threads for the forward pass, {decode} decode threads" in logs[0]
    assert chosen["torch_threads"] == 1
    assert f"{cores} cores: 1 torch threads for the forward pass, 3 decode threads" in logs[1]


@pytest.mark.slow
def test_past_the_queue_limit_the_answer_is_503_with_retry_after(tmp_path):
    held = Held(tmp_path)
    held.hold.touch()
    with ServerProcess(held.artifact, tmp_path / "server.log", max_queue=3) as server, \
            httpx.Client(base_url=server.url, timeout=60) as http, ThreadPoolExecutor(3) as pool:
        admitted = [pool.submit(http.post, "/invocations", content=bin_photo(i), headers=JPEG)
                    for i in range(3)]
        held.wait_calls(1)
        wait_load(http, in_flight=3)  # all three admitted (in the held batch, or behind it)
        refused = http.post("/invocations", content=bin_photo(9), headers=JPEG)
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert "server busy" in refused.json()["error"]
        assert http.get("/ping").status_code == 200  # health is not throttled
        held.hold.unlink()
        assert [f.result().status_code for f in admitted] == [200, 200, 200]
        assert http.post("/invocations", content=bin_photo(9), headers=JPEG).status_code == 200
        assert re.search(r'"POST /invocations" 503 [\d.]+ ms', server.log())


@pytest.mark.slow
def test_a_request_past_its_timeout_is_503_and_its_work_dropped(tmp_path):
    held = Held(tmp_path)
    held.hold.touch()
    with ServerProcess(held.artifact, tmp_path / "server.log", request_timeout_s=3.0) as server, \
            httpx.Client(base_url=server.url, timeout=60) as http, ThreadPoolExecutor(2) as pool:
        first = pool.submit(http.post, "/invocations", content=bin_photo(1), headers=JPEG)
        held.wait_calls(1)
        late = http.post("/invocations", content=bin_photo(2), headers=JPEG)  # queued, times out
        assert late.status_code == 503 and "no answer within 3 s" in late.json()["error"]
        assert late.headers["retry-after"] == "1"
        assert first.result().status_code == 503  # held past its own timeout too
        held.hold.unlink()
        time.sleep(1.0)  # the held forward pass finishes (a running forward pass is not stopped)
        assert http.post("/invocations", content=bin_photo(3), headers=JPEG).status_code == 200
        # The timed-out second request never reached predict_fn: the calls are the first and
        # the last request only.
        assert held.calls() == [1, 1]


def raw_request(port: int, body: bytes, length: int | None = None) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = (f"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\n\r\n").encode()
    sock.sendall(head + body)
    return sock


@pytest.mark.slow
def test_work_is_dropped_when_the_client_goes_away(tmp_path):
    held = Held(tmp_path)
    held.hold.touch()
    with ServerProcess(held.artifact, tmp_path / "server.log") as server, \
            httpx.Client(base_url=server.url, timeout=60) as http, ThreadPoolExecutor(1) as pool:
        first = pool.submit(http.post, "/invocations", content=bin_photo(1), headers=JPEG)
        held.wait_calls(1)
        gone = raw_request(server.port, bin_photo(2))
        wait_load(http, queued=1)  # decoded and queued behind the held batch
        gone.close()
        wait_log(server, '"POST /invocations" 499')  # the server saw it go
        held.hold.unlink()
        assert first.result().status_code == 200
        assert http.post("/invocations", content=bin_photo(3), headers=JPEG).status_code == 200
        assert held.calls() == [1, 1]  # the departed client's photo was never scored
        assert re.search(r'"POST /invocations" 499 [\d.]+ ms \(client left before the answer',
                         server.log())


@pytest.fixture(scope="module")
def plain_server(tiny_artifact, tmp_path_factory):
    """One server for the tests that need no held model: 1 s deadlines for headers and body."""
    log = tmp_path_factory.mktemp("plain") / "server.log"
    with ServerProcess(tiny_artifact, log, header_timeout_s=1.0, body_timeout_s=1.0) as server:
        yield server


@pytest.mark.slow
def test_an_aborted_upload_is_one_log_line_not_a_traceback(plain_server):
    server = plain_server
    sock = raw_request(server.port, b"\xff\xd8\xff" + bytes(997), length=100_000)
    time.sleep(0.3)
    sock.close()
    wait_log(server, "aborted upload", timeout=10)
    with httpx.Client(base_url=server.url) as http:
        assert http.get("/ping").status_code == 200
    log = server.log()
    lines = [line for line in log.splitlines() if "aborted upload" in line]
    assert len(lines) == 1, log
    assert re.search(r'"POST /invocations" 499 [\d.]+ ms \(aborted upload: client left after '
                     r'1000 of 100000 bytes\)', lines[0])
    assert "Traceback" not in log and "Exception" not in log


@pytest.mark.slow
def test_slow_clients_are_cut_off(plain_server):
    server = plain_server
    # Headers trickled a byte at a time: the connection is closed at the deadline.
    trickle = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    started, closed = time.monotonic(), False
    for byte in b"POST /invocations HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
        try:
            trickle.sendall(bytes([byte]))
        except OSError:
            closed = True
            break
        time.sleep(0.05)
        if time.monotonic() - started > 5:
            break
    if not closed:
        trickle.settimeout(5)
        try:
            closed = trickle.recv(100) == b""
        except ConnectionResetError:
            closed = True
    assert closed and time.monotonic() - started < 5
    trickle.close()
    # A connection that sends nothing is closed too.
    idle = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    assert idle.recv(100) == b""
    idle.close()
    # A body trickled past its deadline: 408 with a JSON error, connection closed.
    slow = raw_request(server.port, b"\xff\xd8\xff", length=5000)
    answer = b""
    while True:
        chunk = slow.recv(4096)
        if not chunk:
            break
        answer += chunk
    slow.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"did not arrive within 1 s" in answer and b"connection: close" in answer.lower()
    with httpx.Client(base_url=server.url) as http:
        assert http.get("/ping").status_code == 200
    assert "no complete request headers within 1 s" in server.log()


@pytest.mark.slow
def test_one_access_log_line_per_request_with_status_and_latency(plain_server):
    server = plain_server
    before = len(access_lines(server.log()))
    with httpx.Client(base_url=server.url) as http:
        statuses = [http.post("/invocations", content=bin_photo(i), headers=JPEG).status_code
                    for i in range(3)]
        statuses.append(http.post("/invocations", content=b"nope", headers=JPEG).status_code)
        statuses.append(http.post("/invocations", content=b"x", headers={}).status_code)
    # Each line is written as its answer is sent.
    wait_for(lambda: len(access_lines(server.log())[before:]) >= 5, 10,
             lambda: f"5 access-log lines: {access_lines(server.log())[before:]}")
    lines = access_lines(server.log())[before:]
    assert statuses == [200, 200, 200, 400, 415]
    assert len(lines) == 5, lines
    for line, status in zip(lines, statuses):
        assert re.search(rf'127\.0\.0\.1:\d+ "POST /invocations" {status} \d+\.\d ms', line), line


@pytest.mark.slow
def test_the_thread_plan_gives_torch_every_core_and_decoding_a_quarter(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert plan(cores=2) == plan(0, 0, 2)
    assert (plan(cores=1).torch_threads, plan(cores=1).decode_workers) == (1, 1)
    assert (plan(cores=2).torch_threads, plan(cores=2).decode_workers) == (2, 1)
    assert (plan(cores=16).torch_threads, plan(cores=16).decode_workers) == (16, 4)
    assert (plan(4, 2, cores=16).torch_threads, plan(4, 2, cores=16).decode_workers) == (4, 2)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # an explicit setting wins over the core count
    assert plan(cores=16).torch_threads == 3 and plan(5, cores=16).torch_threads == 5
