"""Real ABID in from S3: `invmon data fetch`, the runner's mirror and Preprocess reading S3 itself,
against moto (in-process and its server on 127.0.0.1), with every kind of damaged file."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest

from abid_bucket import (BUCKET, PREFIX, bucket_objects, fill_bucket, mirror_bytes,
                         write_manifest)
from aws_testing import aws_env, moto_server, patched_environ
from conftest import ROOT, import_script

ingest = import_script("preprocess", "ingest")
s3fetch = import_script("preprocess", "s3fetch")
preprocess = import_script("preprocess", "preprocess")
SOURCE = f"s3://{BUCKET}/{PREFIX}"


@pytest.fixture(scope="module")
def dataset():
    return bucket_objects(per_count=4)


@pytest.fixture
def server(dataset):
    """moto's server on 127.0.0.1 holding the bucket (per test: an in-process mock_aws elsewhere
    resets the state the server thread shares)."""
    with moto_server() as url:
        env = aws_env(url)
        with patched_environ(env):
            fill_bucket(boto3.client("s3"), dataset[0])
        yield url, env


def expected_report_problems(expected) -> set[tuple[str, str, str]]:
    return {(i, f, kind) for (i, f), kind in expected["problems"].items()}


def check_mirror_and_report(out: Path, dataset) -> dict:
    objects, manifest, expected = dataset
    report = json.loads((out / "fetch_report.json").read_text())
    got = {(p["id"], p["file"], p["kind"]) for p in report["problems"]}
    assert got == expected_report_problems(expected)
    assert all(p["reason"] for p in report["problems"])
    assert [d["ids"] for d in report["duplicates"]] == expected["duplicates"]
    listed = {Path(e).stem for entries in manifest.values() for e in entries}
    assert report["requested"] == len(listed)
    # The mirror holds exactly the listed objects that exist, byte for byte; nothing unlisted.
    want = {k[len(PREFIX):]: v for k, v in objects.items() if Path(k).stem in listed}
    assert mirror_bytes(out) == want
    assert not any(p.name.startswith(".") and ".part-" in p.name for p in out.rglob("*"))
    bad_ids = {i for i, _ in expected["problems"]}
    assert report["usable"] == len(listed - bad_ids)
    return report


def test_fetch_in_process_mirrors_exactly_the_manifest_and_names_every_problem(dataset, tmp_path):
    from moto import mock_aws

    objects, manifest, expected = dataset
    with patched_environ(aws_env()), mock_aws():
        fill_bucket(boto3.client("s3"), objects)
        # botocore: moto's in-process mock intercepts botocore only (the CRT would go out).
        report = ingest.fetch_dataset(SOURCE, tmp_path / "mirror",
                                      write_manifest(tmp_path / "file_list.json", manifest), workers=4,
                                      s3_client="botocore")
    check_mirror_and_report(tmp_path / "mirror", dataset)
    reasons = {(p["id"], p["kind"]): p["reason"] for p in report["problems"]}
    assert "6324x6324" in reasons[("x_pngbomb", "too_large")]
    assert "manifest says 3, metadata says 2" == reasons[("x_mismatch", "label_mismatch")]
    assert "nested too deeply" in reasons[("x_deep", "unlabelled")]


@pytest.mark.slow
def test_fetch_command_killed_midway_then_rerun_gives_the_same_mirror_and_report(server, dataset, tmp_path):
    url, env = server
    manifest = write_manifest(tmp_path / "file_list.json", dataset[1])
    command = [sys.executable, "-m", "pipeline", "data", "fetch", "--source", SOURCE,
               "--manifest", str(manifest), "--workers", "1"]
    clean = subprocess.run([*command, "--out", str(tmp_path / "clean")], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert clean.returncode == 0, clean.stderr
    assert "usable" in clean.stderr  # the fetch's account is a message (logging), not the result

    # Kill -9 once a few objects have landed, then run again to the end.
    out = tmp_path / "killed"
    proc = subprocess.Popen([*command, "--out", str(out)], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ledger = out / ".fetch-ledger.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if ledger.exists() and len(ledger.read_text().splitlines()) >= 8:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "fetch_report.json").exists(), "the kill came too late to test anything"
    landed = len(ledger.read_text().splitlines())
    # A damaged file (changed after it was verified) must be fetched again, not trusted.
    first = json.loads(ledger.read_text().splitlines()[0])["file"]
    (out / first).write_bytes(b"damaged")
    rerun = subprocess.run([*command, "--out", str(out)], env=env, cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert mirror_bytes(out) == mirror_bytes(tmp_path / "clean")
    assert (out / "fetch_report.json").read_bytes() == (tmp_path / "clean" / "fetch_report.json").read_bytes()
    check_mirror_and_report(out, dataset)
    # Only what was missing or damaged was fetched again.
    entries = [json.loads(line) for line in ledger.read_text().splitlines()]
    refetched = [e["file"] for e in entries[landed:]]
    assert first in refetched and len(refetched) == len({e["file"] for e in entries}) - landed + 1


def test_throttling_and_server_errors_are_retried_by_botocore(dataset, tmp_path):
    """A store that answers 503 SlowDown twice per object: botocore's standard retry mode
    backs off and the fetch still gets every byte right."""
    from botocore.awsrequest import AWSResponse
    from moto import mock_aws

    objects, manifest, _ = dataset
    calls: dict[str, int] = {}

    def flaky(request, **_):
        if request.method != "GET" or "/bin-images/" not in request.url:
            return None
        calls[request.url] = calls.get(request.url, 0) + 1
        if calls[request.url] <= 2:
            body = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
            raw = type("Raw", (), {"stream": lambda self, **_: iter([body]), "read": lambda self, *a: body})()
            return AWSResponse(request.url, 503, {"Content-Type": "application/xml"}, raw)
        return None

    with patched_environ(aws_env()), mock_aws():
        fill_bucket(boto3.client("s3"), objects)
        client = s3fetch.make_client(2)
        client.meta.events.register("before-send.s3.GetObject", flaky)
        mirror = s3fetch.Mirror(client, BUCKET, PREFIX, tmp_path / "m")
        got = mirror.fetch("bin-images/x_dup_a.jpg")
    assert got.status == "fetched"
    assert got.path.read_bytes() == objects[f"{PREFIX}bin-images/x_dup_a.jpg"]
    assert list(calls.values()) == [3]
    assert client.meta.config.retries["mode"] == "standard"


def test_anonymous_access_when_no_credentials_are_configured(server, dataset, tmp_path):
    from botocore import UNSIGNED

    url, env = server
    anonymous = {k: v for k, v in env.items()
                 if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")}
    with patched_environ(anonymous):
        client = s3fetch.make_client(2)
        assert client.meta.config.signature_version is UNSIGNED
        mirror = s3fetch.Mirror(client, BUCKET, PREFIX, tmp_path / "anon")
        assert mirror.fetch("metadata/x_dup_a.json").status == "fetched"


def test_selection_rule_draws_per_count_from_the_metadata(server, dataset, tmp_path):
    url, env = server
    with patched_environ(env):
        rule = ingest.Selection(counts=(1, 2, 5), per_count=2, seed=7)
        report = ingest.fetch_dataset(SOURCE, tmp_path / "sel", None, rule, workers=4)
        again = ingest.fetch_dataset(SOURCE, tmp_path / "sel2", None, rule, workers=2)
    assert report == again  # seeded: the same draw whatever the worker count
    assert report["selection"] == {"counts": [1, 2, 5], "per_count": 2, "seed": 7}
    assert report["requested"] == 6
    ids = {p.stem for p in (tmp_path / "sel" / "bin-images").glob("*.jpg")}
    labels = {i: json.loads((tmp_path / "sel" / "metadata" / f"{i}.json").read_text())["EXPECTED_QUANTITY"]
              for i in ids}
    assert sorted(labels.values()) == [1, 1, 2, 2, 5, 5]


def test_bad_source_is_one_clear_line(server, tmp_path):
    url, env = server
    done = subprocess.run([sys.executable, "-m", "pipeline", "data", "fetch", "--source",
                           "s3://no-such-bucket-here/", "--out", str(tmp_path / "x")],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1  # it ran and failed: not a usage error
    assert done.stderr.strip() == "invmon: error: bucket 'no-such-bucket-here' does not exist"


def run_preprocess(env, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "preprocess" / "preprocess.py"),
                           "--resize", "64", "--workers", "2", *args], env=env,
                          capture_output=True, text=True, timeout=300)


def split_tree(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes()
            for s in ("train", "validation", "test") for p in sorted((out / s).rglob("*.jpg"))}


def label_rejections(report: dict) -> set[tuple[str, str, str]]:
    return {(r["id"], r["kind"], r["reason"]) for r in report["rejections"]
            if r["kind"] in ("unlabelled", "manifest_mismatch")}


@pytest.mark.slow
def test_preprocess_reading_s3_equals_preprocess_on_the_mirror_and_shards_add_up(server, dataset, tmp_path):
    url, env = server
    manifest = write_manifest(tmp_path / "file_list.json", dataset[1])
    with patched_environ(env):
        ingest.fetch_dataset(SOURCE, tmp_path / "mirror", manifest, workers=4)
    local = run_preprocess(env, "--input", str(tmp_path / "mirror"), "--manifest", str(manifest),
                           "--output", str(tmp_path / "local"))
    assert local.returncode == 0, local.stderr
    direct = run_preprocess(env, "--input", SOURCE, "--manifest", str(manifest), "--s3-client", "botocore",
                            "--scratch", str(tmp_path / "scratch"), "--output", str(tmp_path / "direct"))
    assert direct.returncode == 0, direct.stderr
    assert split_tree(tmp_path / "direct") == split_tree(tmp_path / "local")
    # The metadata is read into memory, never written: only the photos land on disk.
    assert not (tmp_path / "scratch" / "metadata").exists()
    assert (tmp_path / "scratch" / "bin-images" / "x_dup_a.jpg").exists()

    report = json.loads((tmp_path / "direct" / "report" / "data_report.json").read_text())
    kinds = {(r["id"], r["kind"]) for r in report["rejections"]}
    assert {("x_corrupt", "corrupt"), ("x_trunc", "truncated"), ("x_pngbomb", "too_large"),
            ("x_pngshort", "truncated"), ("x_mismatch", "manifest_mismatch"),
            ("x_deep", "unlabelled"), ("x_hugeint", "unlabelled")} <= kinds
    # Judged in memory by the rule a metadata file on disk is judged by: the same reasons.
    local_report = json.loads((tmp_path / "local" / "report" / "data_report.json").read_text())
    assert len(label_rejections(local_report)) == 4  # no metadata, mismatch, deep, huge integer
    assert label_rejections(report) == label_rejections(local_report) | {
        ("x_missing", "unlabelled", "unlabelled: missing metadata")}  # not in the mirror at all
    if s3fetch.crt_available():  # the CRT's GETs give the same output, byte for byte
        crt = run_preprocess(env, "--input", SOURCE, "--manifest", str(manifest), "--s3-client", "crt",
                             "--output", str(tmp_path / "crt"))
        assert crt.returncode == 0, crt.stderr
        assert split_tree(tmp_path / "crt") == split_tree(tmp_path / "direct")
        crt_report = json.loads((tmp_path / "crt" / "report" / "data_report.json").read_text())
        assert crt_report["rejections"] == report["rejections"]
    assert report["duplicates"][0]["ids"] == ["x_dup_a", "x_dup_b"]
    where = {p.stem: p.parts[-3] for p in (tmp_path / "direct").glob("*/*/x_dup_*.jpg")}
    assert set(where) == {"x_dup_a", "x_dup_b"} and len(set(where.values())) == 1

    # Two instances, each its own shard: together exactly the one-instance output.
    union: dict[str, bytes] = {}
    for index in (0, 1):
        shard = run_preprocess(env, "--input", SOURCE, "--manifest", str(manifest), "--shard",
                               f"{index}/2", "--output", str(tmp_path / "shards"))
        part = split_tree(tmp_path / "shards")
        assert part and not set(part) & set(union)
        union.update(part)
        assert (tmp_path / "shards" / "report" / f"data_report-shard{index}.json").exists()
    assert union == split_tree(tmp_path / "direct")


def test_runner_mirrors_s3_once_through_the_same_code_and_caches_preprocess(server, dataset, tmp_path,
                                                                            invmon_home):
    """`invmon run --data s3://... --manifest FILE`: the runner fetches the selection into its
    cache once; a second run fetches nothing and reuses the cached Preprocess."""
    from pipeline.local.runner import LocalRun
    from pipeline.dag.profiles import defaults
    from steps import preprocess as declared
    from steps.base import Dag

    url, env = server
    manifest = write_manifest(tmp_path / "file_list.json", dataset[1])
    params = {**defaults("local"), "InputDataUrl": SOURCE, "ManifestUrl": str(manifest),
              "ResizeShortSide": 64}
    lines: list[str] = []
    with patched_environ({**env, "INVMON_HOME": str(invmon_home)}):
        first = LocalRun.create(invmon_home, Dag((declared.STEP,)), params, "test", echo=lines.append).execute()
        mirrors = list((invmon_home / "data" / "s3").iterdir())
        ledger = (mirrors[0] / ".fetch-ledger.jsonl").read_text()
        second = LocalRun.create(invmon_home, Dag((declared.STEP,)), params, "test", echo=lines.append).execute()
    assert first["status"] == second["status"] == "Succeeded", first.get("failure")
    assert len(mirrors) == 1 and (mirrors[0] / "fetch_report.json").exists()
    assert (mirrors[0] / ".fetch-ledger.jsonl").read_text() == ledger, "the second run fetched again"
    assert second["steps"]["Preprocess"]["reused_from"] == first["id"]
    report = json.loads((invmon_home / "runs" / first["id"] / "Preprocess" / "processing" / "output"
                         / "report" / "data_report.json").read_text())
    assert report["totals"]["valid"] == len(dataset[2]["good"]) + 2  # + the duplicate pair


# -- the CRT's S3 client (awscrt): used when installed ---------------------------------------------

class FlakyStore:
    """A tiny S3 stand-in on 127.0.0.1 that answers GETs as S3 does (ranges, ETags, XML errors):
    503 SlowDown twice per key first, then the object; a wrong ETag for `bad/`; NoSuchKey for
    what it does not hold. It records every request's headers."""

    def __init__(self, objects: dict[str, bytes]):
        import hashlib
        import http.server
        import threading

        store, seen = self, []
        self.seen = seen

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                seen.append((self.path, dict(self.headers)))
                key = self.path.split("/", 2)[2]
                if key not in objects:
                    return self.answer(404, b"<Error><Code>NoSuchKey</Code><Message>no such key</Message></Error>")
                if sum(p == self.path for p, _ in seen) <= 2:
                    return self.answer(503, b"<Error><Code>SlowDown</Code><Message>Please reduce your "
                                            b"request rate.</Message></Error>")
                body = objects[key]
                etag = hashlib.md5(b"other" if "/bad/" in key else body).hexdigest()
                first, last = 0, len(body) - 1
                if self.headers.get("Range"):
                    first, last = (int(x) for x in self.headers["Range"].split("=")[1].split("-"))
                    last = min(last, len(body) - 1)
                self.answer(206 if self.headers.get("Range") else 200, body[first:last + 1],
                            {"ETag": f'"{etag}"', "Content-Range": f"bytes {first}-{last}/{len(body)}"})

            def answer(self, status, body, headers=None):
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        del store

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.skipif(not s3fetch.crt_available(), reason="awscrt is not installed (the CRT client is optional)")
def test_crt_client_retries_throttling_checks_every_byte_and_signs_only_with_credentials(tmp_path):
    photo = bytes(range(256)) * 40
    store = FlakyStore({"abid/bin-images/a.jpg": photo, "abid/bad/b.jpg": photo,
                        "abid/metadata/a.json": b'{"EXPECTED_QUANTITY": 3}'})
    try:
        with patched_environ(aws_env(store.url)):
            reader = s3fetch.make_reader(None, 2, "crt")
            assert isinstance(reader, s3fetch.CrtReader)
            mirror = s3fetch.Mirror(None, BUCKET, PREFIX, tmp_path / "m", reader)
            got = mirror.fetch("bin-images/a.jpg")
            assert got.status == "fetched" and got.path.read_bytes() == photo
            assert [p for p, _ in store.seen].count(f"/{BUCKET}/abid/bin-images/a.jpg") == 3  # 2 x 503
            bad = mirror.fetch("bad/b.jpg")
            assert bad.status == "failed" and "checksum mismatch" in bad.reason
            assert not (tmp_path / "m" / "bad" / "b.jpg").exists()
            assert mirror.fetch("bin-images/none.jpg").status == "missing"
            meta = mirror.read("metadata/a.json", 1 << 20)
            assert (meta.status, meta.body) == ("fetched", b'{"EXPECTED_QUANTITY": 3}')
            assert ingest.label_of_read(mirror.read("metadata/none.json", 1 << 20)) == \
                (None, "unlabelled: missing metadata")
            assert ingest.label_of_read(mirror.read("metadata/a.json", 8))[1] == \
                "unlabelled: metadata is 24 bytes, not an ABID metadata file"
            assert all(h.get("Authorization", "").startswith("AWS4-HMAC-SHA256") for _, h in store.seen)
        anonymous = {k: v for k, v in aws_env(store.url).items()
                     if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")}
        store.seen.clear()
        with patched_environ(anonymous):
            mirror = s3fetch.Mirror(None, BUCKET, PREFIX, tmp_path / "anon", s3fetch.make_reader(None, 2, "crt"))
            assert mirror.fetch("bin-images/a.jpg").status == "fetched"
        assert store.seen and not any("Authorization" in h for _, h in store.seen)
    finally:
        store.close()


def test_asking_for_the_crt_client_without_awscrt_is_one_line(server, dataset, tmp_path):
    """A container image without awscrt (it is a project dependency, so hide it here)."""
    url, env = server
    hidden = tmp_path / "no-awscrt"
    (hidden / "awscrt").mkdir(parents=True)
    (hidden / "awscrt" / "__init__.py").write_text('raise ImportError("no awscrt in this image")\n')
    env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(hidden), env.get("PYTHONPATH", "")]))}
    manifest = write_manifest(tmp_path / "file_list.json", dataset[1])
    done = run_preprocess(env, "--input", SOURCE, "--manifest", str(manifest), "--s3-client", "crt",
                          "--output", str(tmp_path / "out"))
    assert done.returncode == 2
    assert done.stderr.strip() == "preprocess: error: the CRT S3 client needs awscrt: pip install awscrt"
