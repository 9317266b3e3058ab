"""`invmon predict DIR_OR_GLOB --out counts.csv`: bulk counting, locally and through --url.

Core tests use generated photos plus broken files; the run over the 1,731 real ABID photos is
marked real_data.
"""
from __future__ import annotations

import csv
import threading
import time
import socket
import json

import pytest
import uvicorn

from pipeline.serving import bulk
from pipeline.cli import main as invmon
from pipeline.serving.endpoint import create_app, load_model
from pipeline.registry.local import open_registry
from serving_testing import bin_photo

CLASSES = ["p1", "p2", "p3", "p4", "p5"]


@pytest.fixture
def staged(invmon_home, tiny_artifact):
    """The tiny artifact registered and deployed as the local staging endpoint."""
    registry = open_registry(invmon_home)
    version = registry.register("bin-count", str(tiny_artifact), {})
    registry.deploy("bin-count-staging", "bin-count", version.version)
    return tiny_artifact


@pytest.fixture
def folder(tmp_path):
    """12 generated photos in two sub-folders, plus files that cannot be counted."""
    root = tmp_path / "photos"
    for i in range(12):
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        fmt, suffix = ("PNG", ".png") if i % 3 == 0 else ("JPEG", ".jpg")
        (sub / f"{i:03d}{suffix}").write_bytes(bin_photo(i, (120, 90), fmt))
    (root / "a" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff" + bytes(50))
    (root / "a" / "empty.png").write_bytes(b"")
    (root / "b" / "really_a_png.jpg").write_bytes(bin_photo(99, (40, 30), "PNG"))
    (root / "notes.txt").write_text("not a photo; a folder scan skips it")
    return root


def read_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def check_rows(rows, folder):
    assert len(rows) == 15
    assert list(rows[0]) == ["id", "path", "count", "confidence", *CLASSES, "error"]
    bad = {row["id"]: row["error"] for row in rows if row["error"]}
    assert set(bad) == {"corrupt", "empty", "really_a_png"}
    assert "empty" in bad["empty"] and "PNG image; only JPEG" in bad["really_a_png"]
    for row in rows:
        if row["error"]:
            assert row["count"] == "" and row["confidence"] == ""
            continue
        probs = [float(row[c]) for c in CLASSES]
        assert sum(probs) == pytest.approx(1.0, abs=1e-4)
        assert int(row["count"]) == 1 + probs.index(max(probs))
        assert float(row["confidence"]) == max(probs)


@pytest.mark.slow
def test_bulk_counting_a_folder_writes_every_photo_and_every_bad_file_as_a_row(
        staged, folder, tmp_path, capsys):
    out = tmp_path / "out" / "counts.csv"
    assert invmon(["predict", str(folder), "--out", str(out), "--batch-size", "4"]) == 0
    rows = read_rows(out)
    check_rows(rows, folder)
    assert [row["path"] for row in rows] == sorted(row["path"] for row in rows)
    printed = capsys.readouterr()
    assert "15 photos in" in printed.out and "12 counted, 3 errors" in printed.out
    assert "raw forward pass of the same model at batch 4" in printed.out
    assert "photo" in printed.err  # tqdm's progress bar


@pytest.mark.slow
def test_bulk_answers_match_the_endpoint_one_by_one(staged, folder, tmp_path):
    out = tmp_path / "counts.csv"
    assert invmon(["predict", str(folder / "a" / "*.jpg"), str(folder / "b"), "--out", str(out),
                   "--no-raw"]) == 0
    rows = {row["path"]: row for row in read_rows(out)}
    model = load_model(staged)
    from pipeline.serving.endpoint import predict_local
    for path, row in rows.items():
        if row["error"]:
            continue
        single = predict_local(staged, path, model=model)
        assert int(row["count"]) == single["count"]
        for label, p in single["probabilities"].items():
            assert float(row[f"p{label}"]) == pytest.approx(p, abs=2e-6)


def test_a_glob_matching_nothing_is_a_named_error(staged, tmp_path, capsys):
    assert invmon(["predict", str(tmp_path / "nothing-*.jpg"), "--out", str(tmp_path / "x.csv")]) == 1
    assert "no such photo, folder or matching glob" in capsys.readouterr().err


def test_a_folder_of_only_bad_files_still_gets_its_rows(staged, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jpg").write_bytes(b"junk")
    out = tmp_path / "bad.csv"
    assert invmon(["predict", str(bad), "--out", str(out)]) == 0
    rows = read_rows(out)
    assert len(rows) == 1 and rows[0]["id"] == "x" and "not a decodable" in rows[0]["error"]


def test_bulk_counting_through_a_running_endpoint(staged, folder, tmp_path):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(staged), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    try:
        out = tmp_path / "remote.csv"
        url = "http://127.0.0.1:%d" % sock.getsockname()[1]
        assert invmon(["predict", str(folder), "--url", url, "--out", str(out),
                       "--concurrency", "4"]) == 0
        remote = read_rows(out)
        check_rows(remote, folder)
        local_out = tmp_path / "local.csv"
        assert invmon(["predict", str(folder), "--out", str(local_out), "--no-raw"]) == 0
        local = read_rows(local_out)
        for a, b in zip(remote, local):
            assert (a["path"], a["count"], bool(a["error"])) == (b["path"], b["count"], bool(b["error"]))
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def test_collect_photos_orders_and_filters(folder):
    found = bulk.collect_photos([folder])
    assert len(found) == 15 and all(p.suffix in (".jpg", ".png") for p in found)
    assert found == sorted(found)


@pytest.mark.real_data
def test_bulk_counting_the_real_abid_sample(staged, abid_sample, tmp_path, capsys):
    out = tmp_path / "abid.csv"
    assert invmon(["predict", str(abid_sample), "--out", str(out)]) == 0
    rows = read_rows(out)
    assert len(rows) == 1731
    assert sum(1 for row in rows if not row["error"]) == 1731
    printed = capsys.readouterr().out
    assert "1731 photos in" in printed and "raw forward pass" in printed
    print(json.dumps({"printed": printed}))


def test_a_photo_named_like_a_formula_is_text_in_the_csv(staged, tmp_path):
    """Whoever can name a photo (a bucket writer) must not plant a formula in the reviewer's
    spreadsheet: a cell that would start with = + - @ starts with a quote instead."""
    photos = tmp_path / "named"
    photos.mkdir()
    (photos / "=HYPERLINK(1).jpg").write_bytes(bin_photo(1, (80, 60), "JPEG"))
    (photos / "@SUM(1).png").write_bytes(b"not a png")
    (photos / "plain.jpg").write_bytes(bin_photo(2, (80, 60), "JPEG"))
    out = tmp_path / "counts.csv"
    assert invmon(["predict", str(photos), "--out", str(out)]) == 0
    rows = {row["id"]: row for row in read_rows(out)}
    assert set(rows) == {"'=HYPERLINK(1)", "'@SUM(1)", "plain"}
    assert rows["'=HYPERLINK(1)"]["path"].startswith("/") and rows["'=HYPERLINK(1)"]["count"] in "12345"
    assert rows["'@SUM(1)"]["error"] and rows["plain"]["path"] == str(photos / "plain.jpg")
    assert not any(cell.startswith(("=", "+", "-", "@")) for row in rows.values() for cell in row.values())
