"""The local endpoint's data capture (pipeline/serving/capture.py): bounded (a file size, a folder
size, a queue in bytes, sampling), never slowing or failing a request when the disk is full or the
writer stalls, and recording what was served: the answer, the photo's statistics and the
embedding of the same forward pass.
"""
from __future__ import annotations

import base64
import errno
import json
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, import_script
from serving_testing import bin_photo
from pipeline.serving import capture as capture_module
from pipeline.serving.capture import Capture, Captured, CaptureError
from pipeline.serving.endpoint import ServingSettings, create_app, load_model

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

photos = import_script("inference", "photos")
MIB = 1024 * 1024


def record(i: int = 0, body: bytes | None = None, **fields) -> Captured:
    return Captured(time.time(), f"r{i}", "bin-count/1", "m", "image/jpeg", 1000,
                    {"count": 3, "probabilities": {"3": 1.0}, "model_version": "bin-count/1"},
                    embedding=np.arange(256, dtype=np.float32), body=body, **fields)


def lines(folder: Path) -> list[dict]:
    return [json.loads(line) for path in sorted(folder.glob("capture-*.jsonl"))
            for line in path.read_text().splitlines()]


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# --------------------------------------------------------------------------- bounded


def test_files_rotate_and_the_folder_stays_under_its_cap(tmp_path):
    capture = Capture(tmp_path, file_bytes=8_000, max_bytes=30_000, queue_bytes=MIB).start()
    (tmp_path / "unrelated.txt").write_text("not a capture file: never deleted")
    for i in range(60):  # ~1.6 KB a line (the embedding), ~100 KB in all
        assert capture.offer(record(i))
        wait_for(lambda: capture.written == i + 1)
    capture.stop()
    files = sorted(tmp_path.glob("capture-*.jsonl"))
    assert len(files) >= 2 and all(p.stat().st_size <= 8_000 for p in files)
    assert sum(p.stat().st_size for p in files) <= 30_000
    kept = lines(tmp_path)
    # The oldest were deleted: what is left is the newest, in order, each line whole.
    ids = [int(r["request_id"][1:]) for r in kept]
    assert ids == list(range(60 - len(ids), 60)) and len(ids) < 60
    assert (tmp_path / "unrelated.txt").exists()
    vector = np.frombuffer(base64.b64decode(kept[-1]["embedding"]["base64"]), "<f4")
    np.testing.assert_array_equal(vector, np.arange(256))


def test_sampling_of_requests_and_of_bodies(tmp_path):
    capture = Capture(tmp_path, file_bytes=MIB, max_bytes=4 * MIB, queue_bytes=MIB,
                      sample=0.25, body_sample=0.5, seed=1)
    drawn = [capture.wants() for _ in range(2000)]
    taken = sum(take for take, _ in drawn)
    bodies = sum(body for _, body in drawn)
    assert 420 < taken < 580 and 180 < bodies < 320  # 500 and 250 expected
    assert all(take for take, body in drawn if body)
    never = Capture(tmp_path, file_bytes=MIB, max_bytes=MIB, queue_bytes=MIB)
    assert {never.wants() for _ in range(200)} == {(True, False)}  # the defaults: all, no bytes


def test_a_sampled_body_is_kept_byte_for_byte(tmp_path):
    capture = Capture(tmp_path, file_bytes=MIB, max_bytes=MIB, queue_bytes=MIB).start()
    body = bin_photo(1, (64, 48))
    capture.offer(record(0, body=body))
    capture.offer(record(1))
    capture.stop()
    first, second = lines(tmp_path)
    assert base64.b64decode(first["body"]) == body and "body" not in second


@pytest.mark.parametrize("settings", [dict(sample=1.5), dict(body_sample=-0.1),
                                      dict(file_bytes=10, max_bytes=5), dict(queue_bytes=0)])
def test_settings_out_of_range_are_refused_in_one_line(tmp_path, settings):
    sizes = dict(file_bytes=MIB, max_bytes=MIB, queue_bytes=MIB)
    with pytest.raises(CaptureError):
        Capture(tmp_path, **{**sizes, **settings})


# --------------------------------------------------------------------------- full disk, stalled writer


class FullDisk:
    """A file whose writes fail as a full disk's do, until `recover()`."""

    full = True

    def __init__(self, real):
        self.real = real

    def write(self, data):
        if FullDisk.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.real.write(data)

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_a_full_disk_drops_and_counts_then_recovers(tmp_path, monkeypatch):
    real_open = open
    monkeypatch.setattr(capture_module, "open", lambda *a, **k: FullDisk(real_open(*a, **k)), raising=False)
    FullDisk.full = True
    capture = Capture(tmp_path, file_bytes=MIB, max_bytes=MIB, queue_bytes=MIB).start()
    for i in range(5):
        assert capture.offer(record(i))  # accepted: the failure is the writer's, later
    wait_for(lambda: capture.status()["dropped"] == 5)
    status = capture.status()
    assert status["dropped_by_reason"] == {"ENOSPC": 5} and status["written"] == 0
    assert "No space left" in status["last_error"]
    FullDisk.full = False
    capture.offer(record(5))
    capture.stop()
    assert [r["request_id"] for r in lines(tmp_path)] == ["r5"]


def test_a_stalled_writer_never_holds_an_offer(tmp_path):
    release = threading.Event()

    def stuck(image, side):  # the writer computes the statistics: here it hangs, as on a dead disk
        release.wait(30)
        return {}

    capture = Capture(tmp_path, file_bytes=MIB, max_bytes=MIB, queue_bytes=20_000).start()
    slowest = 0.0
    for i in range(200):
        started = time.perf_counter()
        capture.offer(record(i, image=photos_image(), side=8, statistics=stuck))
        slowest = max(slowest, time.perf_counter() - started)
    assert slowest < 0.01
    dropped = capture.status()["dropped_by_reason"]["queue_full"]
    assert 150 < dropped < 200  # ~1.5 KB a record against a 20 KB queue
    release.set()
    capture.stop()
    assert capture.written == 200 - dropped


def photos_image():
    from PIL import Image

    return Image.new("RGB", (8, 8), (10, 20, 30))


# --------------------------------------------------------------------------- in the endpoint


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    from conftest import make_artifact

    return make_artifact(tmp_path_factory.mktemp("capture-artifact"), seed=3, image_size=64,
                         model_id="capture-model")


def post_all(app, bodies: list[bytes]) -> tuple[list[bytes], dict]:
    with TestClient(app) as client:
        answers = []
        for body in bodies:
            response = client.post("/invocations", content=body, headers={"Content-Type": "image/jpeg"})
            assert response.status_code == 200, response.text
            answers.append(response.content)
        ping = client.get("/ping").json()
    return answers, ping


@pytest.mark.slow
def test_the_endpoint_captures_what_it_served_and_answers_the_same(artifact, tmp_path):
    bodies = [bin_photo(i, (200 + 10 * i, 150)) for i in range(6)]
    plain, ping = post_all(create_app(artifact, model_version="bin-count/4"), bodies)
    assert "capture" not in ping
    settings = ServingSettings(capture_dir=str(tmp_path), capture_body_sample=1.0)
    captured, ping = post_all(create_app(artifact, model_version="bin-count/4", settings=settings), bodies)
    assert captured == plain  # byte for byte: the capture changes nothing in an answer
    assert ping["capture"]["dropped"] == 0
    by_body = {base64.b64decode(r["body"]): r for r in lines(tmp_path)}
    assert len(by_body) == 6
    model = load_model(artifact)
    for body, answer in zip(bodies, plain):
        r = by_body[body]
        assert base64.b64decode(r["body"]) == body and r["size"] == len(body)
        assert (r["model_version"], r["model_id"], r["content_type"]) == ("bin-count/4", "capture-model", "image/jpeg")
        expected = json.loads(answer)
        assert r["answer"] == {"count": expected["count"], "probabilities": expected["probabilities"]}
        assert r["image"] == photos.statistics(photos.decode(body), 64)
        image = model.inference.input_fn(body, "image/jpeg")
        _, embedding = model.inference.predict_and_embed([image], model.model)
        vector = np.frombuffer(base64.b64decode(r["embedding"]["base64"]), "<f4")
        np.testing.assert_allclose(vector, embedding[0], rtol=1e-4, atol=1e-5)
        assert r["time"].endswith("Z") and len(r["request_id"]) == 32


def test_requests_are_answered_when_the_capture_disk_is_full(artifact, tmp_path, monkeypatch):
    real_open = open
    monkeypatch.setattr(capture_module, "open", lambda *a, **k: FullDisk(real_open(*a, **k)), raising=False)
    FullDisk.full = True
    app = create_app(artifact, settings=ServingSettings(capture_dir=str(tmp_path)))
    with TestClient(app) as client:
        for i in range(8):
            response = client.post("/invocations", content=bin_photo(i, (120, 90)),
                                   headers={"Content-Type": "image/jpeg", "X-Request-Id": f"req-{i}"})
            assert response.status_code == 200
        wait_for(lambda: client.get("/ping").json()["capture"]["dropped"] == 8)
        assert client.get("/ping").json()["capture"]["dropped_by_reason"] == {"ENOSPC": 8}
    assert lines(tmp_path) == []


def test_requests_are_answered_at_full_speed_while_the_writer_stalls(artifact, tmp_path, monkeypatch):
    release = threading.Event()
    real_write = Capture._write
    monkeypatch.setattr(Capture, "_write", lambda self, batch: (release.wait(60), real_write(self, batch)))
    settings = ServingSettings(capture_dir=str(tmp_path), capture_queue_mb=0.05)  # ~50 KB: a few records
    app = create_app(artifact, settings=settings)
    with TestClient(app) as client:
        started = time.perf_counter()
        for i in range(30):
            assert client.post("/invocations", content=bin_photo(i, (120, 90)),
                               headers={"Content-Type": "image/jpeg"}).status_code == 200
        elapsed = time.perf_counter() - started
        status = client.get("/ping").json()["capture"]
        assert status["dropped_by_reason"].get("queue_full", 0) >= 20 and status["written"] == 0
        release.set()
        wait_for(lambda: client.get("/ping").json()["capture"]["written"] == 30 - status["dropped"])
    assert elapsed < 30  # 30 small photos through a 64 px ResNet-18: well under a second each


def test_a_bad_capture_setting_stops_the_server_in_one_line(artifact, tmp_path):
    result = subprocess.run([sys.executable, "-m", "pipeline.serving.http_server", str(artifact),
                             "--capture-dir", str(tmp_path), "--capture-sample", "2"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "cannot serve: capture_sample 2.0 refused: a share of requests, 0 to 1"]
