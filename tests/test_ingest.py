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
        report = ingest.fetch_dataset(SOURCE, tmp_path / "mirror",
                                      write_manifest(tmp_path / "file_list.json", manifest), workers=4)
    check_mirror_and_report(tmp_path / "mirror", dataset)
    reasons = {(p["id"], p["kind"]): p["reason"] for p in report["problems"]}
    assert "6324x6324" in reasons[("x_pngbomb", "too_large")]
    assert "manifest says 3, metadata says 2" == reasons[("x_mismatch", "label_mismatch")]
    assert "nested too deeply" in reasons[("x_deep", "unlabelled")]


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


def test_preprocess_reading_s3_equals_preprocess_on_the_mirror_and_shards_add_up(server, dataset, tmp_path):
    url, env = server
    manifest = write_manifest(tmp_path / "file_list.json", dataset[1])
    with patched_environ(env):
        ingest.fetch_dataset(SOURCE, tmp_path / "mirror", manifest, workers=4)
    local = run_preprocess(env, "--input", str(tmp_path / "mirror"), "--manifest", str(manifest),
                           "--output", str(tmp_path / "local"))
    assert local.returncode == 0, local.stderr
    direct = run_preprocess(env, "--input", SOURCE, "--manifest", str(manifest),
                            "--output", str(tmp_path / "direct"))
    assert direct.returncode == 0, direct.stderr
    assert split_tree(tmp_path / "direct") == split_tree(tmp_path / "local")

    report = json.loads((tmp_path / "direct" / "report" / "data_report.json").read_text())
    kinds = {(r["id"], r["kind"]) for r in report["rejections"]}
    assert {("x_corrupt", "corrupt"), ("x_trunc", "truncated"), ("x_pngbomb", "too_large"),
            ("x_pngshort", "truncated"), ("x_mismatch", "manifest_mismatch"),
            ("x_deep", "unlabelled"), ("x_hugeint", "unlabelled")} <= kinds
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
