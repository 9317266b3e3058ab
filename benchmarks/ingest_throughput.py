"""Ingest: what reading ABID from S3 costs the fetcher's CPU, against decoding and checking the photos.

    python benchmarks/ingest_throughput.py [--fetch-workers 8] [--workers 2] [--rounds 2] [--limit N]

The bucket is served by moto's server in its own process on 127.0.0.1 and holds the real ABID
sample (../shared/data/abid-sample, 1,731 photos; metadata generated from the counts) or, without
it, pipeline.data.synth's generated bin photos at 640x480. Everything below runs in this process,
each figure beside its baseline:

  fetch    the fetch alone (fetch workers threads, no decoding), CPU seconds of this process per
           photo (time.process_time: every thread, awscrt's native ones included; the server's
           CPU is its own process's):
             baseline   what Preprocess did before: metadata and photo each fetched to disk through
                        botocore, the label read back from the file;
             botocore   metadata read into memory (verified, never written), photo to disk;
             crt        the same through awscrt's S3 client (when awscrt is installed).
  decode   photos.decode on the same bytes in this process: the decode and check Preprocess makes
           of every photo (draft decode at the resize target), and with resize + JPEG save.
  job      scripts/preprocess end to end, wall clock: on a local folder (raw) and reading s3://
           itself with each fetch above, alternating; median of the rounds.
The goal: fetch CPU per photo <= 1.5 x decode+check CPU per photo.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import abid
import ingest
import photos as photo_rule
import preprocess
import s3fetch
from pipeline.data import synth

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT.parent / "shared" / "data" / "abid-sample"
BUCKET, PREFIX = "abid-bench", "abid/"
GOAL = 1.5


def photos(limit: int, scratch: Path) -> dict[str, tuple[bytes, bytes]]:
    """{id: (JPEG, metadata JSON)} in ABID's layout: the real sample with metadata made from its
    counts, or generated bins (written to `scratch`)."""
    found = {}
    if SAMPLE.is_dir():
        for count in range(1, 6):
            for path in sorted((SAMPLE / str(count)).glob("*.jpg")):
                meta = {"BIN_FCSKU_DATA": {}, "EXPECTED_QUANTITY": count}
                found[path.stem] = (path.read_bytes(), json.dumps(meta).encode())
    else:
        synth.write_dataset(scratch, per_class=-(-(limit or 1000) // 5), seed=0, size=(640, 480))
        for meta in sorted((scratch / "metadata").glob("*.json")):
            found[meta.stem] = ((scratch / "bin-images" / f"{meta.stem}.jpg").read_bytes(), meta.read_bytes())
    items = sorted(found.items())
    return dict(items[:limit] if limit else items)


# -- the fetch alone ------------------------------------------------------------------------------
def baseline_label(mirror, image_id: str):
    """Before: the metadata fetched to a file (ledger line and all), its label read back."""
    return ingest.label_of(mirror.fetch(ingest.metadata_key(image_id)))


def fetch_cpu(ids: list[str], transport: str, workers: int, scratch: Path, baseline=False) -> tuple[float, float]:
    """(CPU seconds of this process, wall seconds) to fetch every id's label and photo."""
    shutil.rmtree(scratch, ignore_errors=True)
    client = s3fetch.make_client(workers)
    reader = s3fetch.make_reader(client, workers, transport)
    mirror = s3fetch.Mirror(client, BUCKET, PREFIX, scratch, reader)
    label = baseline_label if baseline else preprocess.fetch_label

    def one(image_id: str):
        got = label(mirror, image_id), mirror.fetch(ingest.image_key(image_id))
        assert got[0][0] is not None and got[1].ok, got
        return got

    cpu, wall = time.process_time(), time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, ids))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    reader.close()
    return cpu, wall


def decode_cpu(data: dict[str, tuple[bytes, bytes]], scratch: Path) -> tuple[float, float]:
    """CPU seconds of photos.decode (draft decode + check, as process_image calls it) over every
    photo, and of process_image itself (decode, check, resize, JPEG save)."""
    cpu = time.process_time()
    for jpeg, _ in data.values():
        photo_rule.decode(jpeg, min_side=32, draft=(256, 256))
    check = time.process_time() - cpu
    scratch.mkdir(parents=True, exist_ok=True)
    tasks = []
    for image_id, (jpeg, _) in data.items():
        (scratch / f"{image_id}.src").write_bytes(jpeg)
        tasks.append(preprocess.Task(image_id, str(scratch / f"{image_id}.src"),
                                     str(scratch / f"{image_id}.jpg"), 256, 32))
    cpu = time.process_time()
    for task in tasks:
        preprocess.process_image(task)
    return check, time.process_time() - cpu


# -- the job --------------------------------------------------------------------------------------
def preprocess_run(source: str, manifest: Path, out: Path, workers: int, fetch_workers: int,
                   transport: str = "botocore") -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process and its decoding processes) of one Preprocess."""
    args = preprocess.build_parser().parse_args([
        "--input", source, "--manifest", str(manifest), "--output", str(out), "--resize", "256",
        "--workers", str(workers), "--fetch-workers", str(fetch_workers), "--s3-client", transport])
    started, cpu = time.perf_counter(), os.times()
    report = preprocess.run(args)
    seconds, after = time.perf_counter() - started, os.times()
    assert report["totals"]["valid"] > 0, report["rejections_by_kind"]
    return seconds, sum(after[:4]) - sum(cpu[:4])


@contextlib.contextmanager
def fetch_as_before():
    """Preprocess with the fetch it had before (metadata to disk through botocore)."""
    kept = preprocess.fetch_label
    preprocess.fetch_label = baseline_label
    try:
        yield
    finally:
        preprocess.fetch_label = kept


@contextlib.contextmanager
def moto_process():
    """moto's server in its own process on 127.0.0.1 (in this process its request handling would
    take the GIL from the fetch threads, and its CPU would count as theirs). Yields (URL, process)."""
    with socket.socket() as s:  # a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        yield url, proc
    finally:
        proc.terminate()
        proc.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fetch-workers", type=int, default=8)
    parser.add_argument("--workers", type=int, default=preprocess.default_workers())
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--limit", type=int, default=0, help="use only the first N photos")
    args = parser.parse_args()
    transports = ["botocore", *(["crt"] if s3fetch.crt_available() else [])]

    with tempfile.TemporaryDirectory(prefix="ingest-bench-") as tmp, moto_process() as (url, server):
        tmp = Path(tmp)
        data = photos(args.limit, tmp / "generated")
        local = tmp / "local"
        (local / "bin-images").mkdir(parents=True)
        (local / "metadata").mkdir()
        manifest: dict[str, list[str]] = {str(c): [] for c in range(1, 6)}
        # This process is the benchmark's: fake credentials and moto's endpoint for every client
        # (preprocess makes its own), nothing of a real AWS account.
        for name in [k for k in os.environ if k.startswith("AWS_")]:
            del os.environ[name]
        os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                          AWS_EC2_METADATA_DISABLED="true", AWS_ENDPOINT_URL=url)
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket=BUCKET)
        for image_id, (jpeg, meta) in data.items():
            for key, body in ((f"bin-images/{image_id}.jpg", jpeg), (f"metadata/{image_id}.json", meta)):
                s3.put_object(Bucket=BUCKET, Key=PREFIX + key, Body=body)
                (local / key).write_bytes(body)
            manifest[str(json.loads(meta)["EXPECTED_QUANTITY"])].append(f"data/metadata/{image_id}.json")
        manifest_path = tmp / "file_list.json"
        manifest_path.write_text(json.dumps(manifest))
        source, ids, n = f"s3://{BUCKET}/{PREFIX}", sorted(data), len(data)
        assert abid.load_manifest(manifest_path).keys() == set(ids)

        # The fetch alone, then the decode alone, then the jobs; rounds alternate.
        fetches: dict[str, list[tuple[float, float]]] = {"baseline": [], **{t: [] for t in transports}}
        checks, full = [], []
        jobs: dict[str, list[tuple[float, float]]] = {"raw": [], "s3 baseline": [], **{f"s3 {t}": [] for t in transports}}
        served: dict[str, list[float]] = {name: [] for name in jobs}
        fetch_cpu(ids[:50], "botocore", args.fetch_workers, tmp / "warm")  # imports, connections
        preprocess_run(str(local), manifest_path, tmp / "warm-out", args.workers, args.fetch_workers)
        for _ in range(args.rounds):
            fetches["baseline"].append(fetch_cpu(ids, "botocore", args.fetch_workers, tmp / "f", baseline=True))
            for t in transports:
                fetches[t].append(fetch_cpu(ids, t, args.fetch_workers, tmp / "f"))
            check, whole = decode_cpu(data, tmp / "decode")
            checks.append(check)
            full.append(whole)
            for name in jobs:
                before = cpu_seconds(server.pid)
                if name == "raw":
                    jobs[name].append(preprocess_run(str(local), manifest_path, tmp / "out", args.workers,
                                                     args.fetch_workers))
                elif name == "s3 baseline":
                    with fetch_as_before():
                        jobs[name].append(preprocess_run(source, manifest_path, tmp / "out", args.workers,
                                                         args.fetch_workers, "botocore"))
                else:
                    jobs[name].append(preprocess_run(source, manifest_path, tmp / "out", args.workers,
                                                     args.fetch_workers, name.split()[1]))
                served[name].append(cpu_seconds(server.pid) - before)

    def ms(seconds: float) -> float:
        return 1000 * seconds / n

    check = ms(statistics.median(checks))
    where = "the real ABID sample" if SAMPLE.is_dir() else "generated 640x480 bin photos"
    print(f"{n} photos ({where}), {args.fetch_workers} fetch threads, {args.workers} decode worker(s), "
          f"median of {args.rounds} rounds, {os.cpu_count()} cores")
    print(f"decode+check                     {check:6.2f} ms CPU/photo (decode, check, resize, save: "
          f"{ms(statistics.median(full)):.2f})")
    base_cpu = ms(statistics.median(c for c, _ in fetches["baseline"]))
    for name, runs in fetches.items():
        cpu, wall = ms(statistics.median(c for c, _ in runs)), statistics.median(w for _, w in runs)
        verdict = "meets" if cpu <= GOAL * check else "misses"
        print(f"fetch {name:<10} {cpu:6.2f} ms CPU/photo = {cpu / check:4.2f}x decode+check ({verdict} "
              f"<= {GOAL}x), {cpu / base_cpu:4.2f}x baseline; {n / wall:7.1f} photos/s")
    if "crt" not in transports:
        print("fetch crt        not measured: awscrt is not installed (pip install awscrt)")
    raw_rate = n / statistics.median(s for s, _ in jobs["raw"])
    for name, runs in jobs.items():
        rate = n / statistics.median(s for s, _ in runs)
        job_cpu = statistics.median(c for _, c in runs)
        print(f"job   {name:<12} {rate:7.1f} images/s = {rate / raw_rate:4.2f}x raw; job CPU {job_cpu:5.1f} s, "
              f"S3 server {statistics.median(served[name]):5.1f} s (same cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
