"""SIGTERM drains the local server: what is in flight finishes, what arrives gets 503, never a
500. A real server process whose forward pass the test holds longer than uvicorn's default
graceful timeout (5 s) would have allowed."""
from __future__ import annotations

import asyncio
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from pipeline.serving.endpoint import ServingSettings
from pipeline.serving.http_server import Draining, graceful_timeout_s, uvicorn_config
from serving_testing import ServerProcess, bin_photo
from test_serving_server import JPEG, Held, wait_load, wait_log


@pytest.mark.slow
def test_sigterm_during_a_long_batch_finishes_it_and_answers_no_5xx(tmp_path):
    held = Held(tmp_path)
    held.hold.touch()
    server = ServerProcess(held.artifact, tmp_path / "server.log").start()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http, ThreadPoolExecutor(2) as pool:
            in_flight = [pool.submit(http.post, "/invocations", content=bin_photo(i), headers=JPEG)
                         for i in range(2)]
            held.wait_calls(1)  # the forward pass is under way (and held)
            wait_load(http, in_flight=2)  # and the second request admitted (a later one would get 503)
            server.process.send_signal(signal.SIGTERM)
            wait_log(server, "shutting down: finishing the requests in progress")
            time.sleep(6.0)  # past uvicorn's default 5 s, which answered these with a plain 500
            assert server.process.poll() is None  # still draining
            held.hold.unlink()
            answers = [f.result() for f in in_flight]
        assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
        assert all("count" in a.json() for a in answers)
        # uvicorn ends by re-raising the signal it caught, as a process stopped by SIGTERM should.
        assert server.process.wait(timeout=30) in (0, -signal.SIGTERM)
        assert "Traceback" not in server.log() and " 500 " not in server.log()
    finally:
        server.stop()


def test_a_request_arriving_while_draining_gets_503_with_retry_after():
    seen = []

    async def app(scope, receive, send):  # stands in for the endpoint
        seen.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    gate = Draining(app, retry_after_s=2)

    async def call(path: str) -> list[dict]:
        sent = []

        async def send(message):
            sent.append(message)

        await gate({"type": "http", "method": "POST", "path": path, "client": ("127.0.0.1", 1)}, None, send)
        return sent

    assert asyncio.run(call("/invocations"))[0]["status"] == 200
    gate.draining = True
    start, body = asyncio.run(call("/invocations"))
    assert start["status"] == 503 and seen == ["/invocations"]  # the endpoint never saw it
    headers = dict(start["headers"])
    assert headers[b"retry-after"] == b"2" and headers[b"content-type"] == b"application/json"
    assert b"shutting down" in body["body"]


def test_the_graceful_timeout_outlasts_any_admitted_request():
    for settings in (ServingSettings(), ServingSettings(request_timeout_s=120, body_timeout_s=30)):
        config = uvicorn_config(lambda *a: None, settings)
        assert config.timeout_graceful_shutdown == graceful_timeout_s(settings)
        assert config.timeout_graceful_shutdown > settings.request_timeout_s + settings.body_timeout_s
