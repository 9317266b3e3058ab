"""The local endpoint: a real ASGI app over a real model artifact, with generated photos (and
one real ABID photo where the sample is there, marked real_data).

Requests go through FastAPI's TestClient and, for the same cases, through a real uvicorn server
on 127.0.0.1, where bad input must still get a JSON 4xx and never a 5xx.
"""
from __future__ import annotations

import io
import os
import random
import shutil
import socket
import tarfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import uvicorn
from PIL import Image

from conftest import make_artifact
from serving_testing import bin_photo
from pipeline.serving.endpoint import (ArtifactError, EndpointError, create_app, predict_local,
                               predict_remote)

with warnings.catch_warnings():  # starlette nudges towards httpx2, which is not installed here
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

LIMIT = 256 * 1024  # a small body limit keeps the over-limit requests small
VERSION = "bin-count/7"


@pytest.fixture(scope="module")
def jpeg_photo(tmp_path_factory) -> Path:
    """A generated photo: the endpoint's contracts never depend on the real sample being there."""
    path = tmp_path_factory.mktemp("photo") / "bin.jpg"
    path.write_bytes(bin_photo(3, (240, 200)))
    return path


@pytest.mark.real_data
def test_a_real_abid_photo_is_counted(client, abid_sample):
    photo = sorted((abid_sample / "3").glob("*.jpg"))[0]
    check_prediction(client.post("/invocations", content=photo.read_bytes(),
                                 headers={"Content-Type": "image/jpeg"}))


@pytest.fixture(scope="module")
def jpeg(jpeg_photo) -> bytes:
    data = jpeg_photo.read_bytes()
    assert len(data) < LIMIT
    return data


@pytest.fixture(scope="module")
def png(jpeg) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """A small PNG that decodes to 64 megapixels: must be refused, not decoded."""
    buffer = io.BytesIO()
    Image.new("1", (8000, 8000)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def client(tiny_artifact):
    with TestClient(create_app(tiny_artifact, model_version=VERSION, max_body_bytes=LIMIT)) as c:
        yield c


class LiveServer:
    """A real uvicorn server in a thread, on a port the OS picks (no race for a free port)."""

    def __init__(self, app):
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.url = "http://127.0.0.1:%d" % self.socket.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]},
                                       daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.socket.close()
        assert not self.thread.is_alive(), "uvicorn did not shut down"


@pytest.fixture(scope="module")
def live(tiny_artifact):
    with LiveServer(create_app(tiny_artifact, model_version=VERSION, max_body_bytes=LIMIT)) as server:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            yield http


def check_prediction(response) -> dict:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    answer = response.json()
    assert answer["count"] in (1, 2, 3, 4, 5)
    assert set(answer["probabilities"]) == {"1", "2", "3", "4", "5"}
    assert sum(answer["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    assert answer["model_version"] == VERSION
    return answer


def bad_requests(jpeg: bytes, bomb: bytes) -> list[tuple[str, int, dict, bytes | None, str]]:
    """(case, expected status, headers, body, words the error must contain)."""
    over = jpeg * (LIMIT // len(jpeg) + 1)
    return [
        ("wrong content type", 415, {"Content-Type": "text/plain"}, jpeg, "text/plain"),
        ("json content type", 415, {"Content-Type": "application/json"}, b"{}", "application/json"),
        ("missing content type", 415, {}, jpeg, "missing Content-Type"),
        ("empty body", 400, {"Content-Type": "image/jpeg"}, b"", "empty"),
        ("not an image", 400, {"Content-Type": "image/png"}, b"hello, not a photo", "not a decodable"),
        ("truncated jpeg", 400, {"Content-Type": "image/jpeg"}, jpeg[: len(jpeg) // 3], "not a decodable"),
        ("decompression bomb", 400, {"Content-Type": "image/png"}, bomb, "pixels"),
        ("over the size limit", 413, {"Content-Type": "image/jpeg"}, over, "limit"),
        ("unsupported accept", 406, {"Content-Type": "image/jpeg", "Accept": "text/html"}, jpeg,
         "text/html"),
    ]


def check_bad(response, status: int, words: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert words.lower() in error.lower(), error


# --------------------------------------------------------------------------- TestClient


def test_ping_names_the_model_version(client):
    # An idle server: nothing admitted, nothing waiting for a forward pass.
    assert client.get("/ping").json() == {"status": "ok", "model_version": VERSION,
                                          "in_flight": 0, "queued": 0}


def test_jpeg_png_and_x_image_photos_get_the_same_count(client, jpeg, png):
    by_jpeg = check_prediction(client.post("/invocations", content=jpeg,
                                           headers={"Content-Type": "image/jpeg"}))
    by_png = check_prediction(client.post("/invocations", content=png,
                                          headers={"Content-Type": "image/png"}))
    by_x = check_prediction(client.post("/invocations", content=jpeg,
                                        headers={"Content-Type": "application/x-image",
                                                 "Accept": "text/html, application/json;q=0.5"}))
    # A PNG of the same decoded pixels is the same image to the model.
    assert by_png == by_jpeg
    assert by_x == by_jpeg


@pytest.mark.parametrize("index", range(9))
def test_bad_requests_get_a_json_4xx(client, jpeg, bomb, index):
    case, status, headers, body, words = bad_requests(jpeg, bomb)[index]
    check_bad(client.post("/invocations", content=body, headers=headers), status, words)


def test_limits_by_declared_length_and_by_bytes_received(client, jpeg):
    # Chunked upload: no Content-Length to check first, so the bytes themselves are counted.
    chunks = (jpeg for _ in range(LIMIT // len(jpeg) + 2))
    check_bad(client.post("/invocations", content=chunks, headers={"Content-Type": "image/jpeg"}),
              413, "over the limit")
    check_bad(client.post("/invocations", content=jpeg,
                          headers={"Content-Type": "image/jpeg", "Content-Length": "x1"}),
              400, "Content-Length")


def test_unknown_routes_and_methods_answer_json(client):
    check_bad(client.get("/nope"), 404, "not found")
    check_bad(client.get("/invocations"), 405, "not allowed")


def test_a_missing_artifact_is_named(tmp_path):
    with pytest.raises(ArtifactError, match="no model artifact at .*nothing-here"):
        create_app(tmp_path / "nothing-here")


def test_predict_local_matches_the_endpoint(client, tiny_artifact, jpeg_photo, tmp_path):
    served = client.post("/invocations", content=jpeg_photo.read_bytes(),
                         headers={"Content-Type": "image/jpeg"}).json()
    local = predict_local(tiny_artifact, jpeg_photo)
    assert (local["count"], local["probabilities"]) == (served["count"], served["probabilities"])
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(EndpointError, match="broken.jpg.*not a decodable"):
        predict_local(tiny_artifact, broken)


# --------------------------------------------------------------------------- real server


def test_real_server_good_and_bad_requests(live, jpeg, png, bomb):
    assert live.get("/ping").json() == {"status": "ok", "model_version": VERSION,
                                        "in_flight": 0, "queued": 0}
    by_jpeg = check_prediction(live.post("/invocations", content=jpeg,
                                         headers={"Content-Type": "image/jpeg"}))
    by_png = check_prediction(live.post("/invocations", content=png,
                                        headers={"Content-Type": "image/png"}))
    assert by_png == by_jpeg
    for case, status, headers, body, words in bad_requests(jpeg, bomb):
        check_bad(live.post("/invocations", content=body, headers=headers), status, words)
    chunks = (jpeg for _ in range(LIMIT // len(jpeg) + 2))
    check_bad(live.post("/invocations", content=chunks, headers={"Content-Type": "image/jpeg"}),
              413, "over the limit")


def test_real_server_refuses_a_declared_oversize_body_before_reading_it(live):
    """Content-Length over the limit is answered at once, without waiting for the body."""
    host, port = live.base_url.host, live.base_url.port
    with socket.create_connection((host, port), timeout=10) as raw:
        raw.sendall(b"POST /invocations HTTP/1.1\r\nHost: localhost\r\nContent-Type: image/jpeg\r\n"
                    b"Content-Length: 500000000\r\n\r\n")  # headers only: the body never comes
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = raw.recv(65536)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413"), answer
    assert b'"error":"body of 500000000 bytes is over the limit' in answer


def test_real_server_survives_a_flood_of_bad_requests(live, jpeg, bomb):
    cases = bad_requests(jpeg, bomb)
    kinds = ["image/jpeg", "image/png", "application/x-image", "text/plain", "", "image/gif",
             "image/jpeg; charset=binary", "multipart/form-data; boundary=x"]

    def one(i: int) -> int:
        rng = random.Random(i)  # one seeded stream per request: the flood is reproducible
        if i % 3 == 0:  # a catalogued bad request
            _, _, headers, body, _ = cases[(i // 3) % len(cases)]
        else:  # random bytes, a cut or flipped photo, under a random content type
            cut = jpeg[: rng.randrange(1, len(jpeg))]
            body = rng.choice([rng.randbytes(rng.randrange(0, 3000)), cut,
                               bytes(b ^ 0xFF if rng.random() < 0.01 else b for b in cut)])
            headers = {"Content-Type": rng.choice(kinds)} if rng.random() < 0.9 else {}
        response = live.post("/invocations", content=body, headers=headers)
        assert "error" in response.json() or response.status_code == 200
        return response.status_code

    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = list(pool.map(one, range(120)))
    assert not [s for s in statuses if s >= 500], statuses
    assert {415, 400, 413, 406} <= set(statuses)
    # Still serving afterwards.
    check_prediction(live.post("/invocations", content=jpeg, headers={"Content-Type": "image/jpeg"}))


def test_predict_remote_against_the_real_server(live, jpeg_photo, tmp_path):
    url = str(live.base_url).rstrip("/")
    answer = predict_remote(url, jpeg_photo)
    assert answer["count"] in (1, 2, 3, 4, 5) and answer["model_version"] == VERSION
    assert predict_remote(url + "/invocations", jpeg_photo) == answer
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    with pytest.raises(EndpointError, match="answered 400.*not a decodable"):
        predict_remote(url, broken)
    with pytest.raises(EndpointError, match="cannot read photo"):
        predict_remote(url, tmp_path / "missing.jpg")
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    with pytest.raises(EndpointError, match="cannot reach endpoint"):
        predict_remote(f"http://127.0.0.1:{port}", jpeg_photo, timeout=5)


@pytest.mark.slow
def test_slow_predictions_do_not_block_the_event_loop(tmp_path, jpeg):
    """predict_fn runs in a threadpool: /ping answers while a prediction is under way."""
    make_artifact(tmp_path)
    started = tmp_path / "predict-started"
    release = tmp_path / "predict-release"
    # An artifact whose predict_fn announces itself, then waits until the test releases it.
    code = tmp_path / "model" / "code" / "inference.py"
    code.write_text(code.read_text() + f"""


import pathlib as _pathlib
import time as _time
_predict_fn = predict_fn


def predict_fn(data, model):
    _pathlib.Path({str(started)!r}).touch()
    deadline = _time.monotonic() + 30
    while not _pathlib.Path({str(release)!r}).exists() and _time.monotonic() < deadline:
        _time.sleep(0.02)
    return _predict_fn(data, model)
""")
    slow = tmp_path / "slow.tar.gz"
    with tarfile.open(slow, "w:gz") as tar:
        for item in sorted((tmp_path / "model").rglob("*")):
            tar.add(item, arcname=item.relative_to(tmp_path / "model").as_posix(), recursive=False)
    shutil.rmtree(tmp_path / "model")
    with LiveServer(create_app(slow)) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(http.post, "/invocations", content=jpeg,
                                  headers={"Content-Type": "image/jpeg"})
            deadline = time.monotonic() + 30
            while not started.exists():  # the prediction is now held inside predict_fn
                assert time.monotonic() < deadline and not pending.done(), "predict_fn never ran"
                time.sleep(0.02)
            with httpx.Client(base_url=server.url, timeout=10) as other:
                assert other.get("/ping").json()["status"] == "ok"  # answered meanwhile
            assert not pending.done()
            release.touch()
            assert pending.result().status_code == 200


def test_a_killed_servers_extracted_artifact_is_removed_by_the_next_one(tmp_path, tiny_artifact):
    """A server killed outright leaves its extracted artifact in the temp folder; loading a
    model removes the folders of servers that are gone, never a live one's."""
    import subprocess
    import sys

    from pipeline.serving import endpoint

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    stale = tmp_path / f"{endpoint.WORKDIR_PREFIX}{gone}-abc"
    live = tmp_path / f"{endpoint.WORKDIR_PREFIX}{os.getpid()}-def"
    other = tmp_path / f"{endpoint.WORKDIR_PREFIX}not-a-pid"
    for folder in (stale, live, other):
        (folder / "code").mkdir(parents=True)
    kept = tmp_path / "kept"  # a link named like a dead server's folder: never followed
    (kept / "code").mkdir(parents=True)
    (tmp_path / f"{endpoint.WORKDIR_PREFIX}{gone}-link").symlink_to(kept)
    assert endpoint.remove_stale_workdirs(tmp_path) == [stale]
    assert not stale.exists() and live.exists() and other.exists() and (kept / "code").is_dir()
    loaded = endpoint.load_model(tiny_artifact)
    assert Path(loaded.workdir.name).name.startswith(f"{endpoint.WORKDIR_PREFIX}{os.getpid()}-")
