"""Ingest throughput: Preprocess reading ABID from S3 next to Preprocess on the same photos on disk.

    python benchmarks/ingest_throughput.py [--fetch-workers 8] [--workers 2] [--rounds 2] [--limit N]

The bucket is served by moto's server on 127.0.0.1 and holds the real ABID sample
(../shared/data/abid-sample, 1,731 photos; metadata generated from the counts) or, without it,
pipeline.data.synth's generated bin photos at 640x480. Two numbers, in images per second, for the same images in the same process:
  raw      scripts/preprocess on a local ABID folder: decode, check, resize, split, write;
  ingest   the same script reading s3:// itself: the manifest's objects fetched (MD5-checked
           against their ETags, written atomically) while they are decoded, checked, resized.
The ratio ingest / raw is what reading from S3 costs (goal >= 0.8 with 8 fetch workers). The
rounds alternate and the median is reported, so a machine shared with other work slows both.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import boto3
import preprocess
from pipeline.data import synth

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT.parent / "shared" / "data" / "abid-sample"
BUCKET, PREFIX = "abid-bench", "abid/"


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


def preprocess_seconds(source: str, manifest: Path, out: Path, workers: int, fetch_workers: int) -> float:
    args = preprocess.build_parser().parse_args([
        "--input", source, "--manifest", str(manifest), "--output", str(out), "--resize", "256",
        "--workers", str(workers), "--fetch-workers", str(fetch_workers)])
    started, cpu = time.perf_counter(), os.times()
    report = preprocess.run(args)
    seconds, after = time.perf_counter() - started, os.times()
    assert report["totals"]["valid"] > 0, report["rejections_by_kind"]
    # This process and its decoding processes: what the job itself costs, server aside.
    used = sum(after[:4]) - sum(cpu[:4])
    return seconds, used


@contextlib.contextmanager
def moto_process():
    """moto's server in its own process on 127.0.0.1 (in this process its request handling would
    take the GIL from the fetch threads under measurement). Yields (URL, process)."""
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
        source = f"s3://{BUCKET}/{PREFIX}"
        raw, ingest, served = [], [], []
        preprocess_seconds(str(local), manifest_path, tmp / "warm", args.workers, args.fetch_workers)
        for _ in range(args.rounds):
            raw.append(preprocess_seconds(str(local), manifest_path, tmp / "raw", args.workers, args.fetch_workers))
            before = cpu_seconds(server.pid)
            ingest.append(preprocess_seconds(source, manifest_path, tmp / "s3", args.workers, args.fetch_workers))
            served.append(cpu_seconds(server.pid) - before)
    n = len(data)
    raw_rate = n / statistics.median(s for s, _ in raw)
    ingest_rate = n / statistics.median(s for s, _ in ingest)
    raw_cpu, ingest_cpu = statistics.median(c for _, c in raw), statistics.median(c for _, c in ingest)
    where = "the real ABID sample" if SAMPLE.is_dir() else "generated 640x480 bin photos"
    print(f"{n} photos ({where}), {args.workers} decode worker(s), {args.fetch_workers} fetch workers, "
          f"median of {args.rounds} rounds")
    print(f"raw     (local folder: decode+check+resize+split) {raw_rate:8.1f} images/s")
    print(f"ingest  (s3:// from moto on 127.0.0.1, same work)  {ingest_rate:8.1f} images/s")
    print(f"ratio   ingest / raw                               {ingest_rate / raw_rate:8.2f}")
    server_cpu = statistics.median(served)
    print(f"cpu     job {raw_cpu:.1f} s raw, {ingest_cpu:.1f} s ingest (ratio raw/ingest "
          f"{raw_cpu / ingest_cpu:.2f}); the S3 server took another {server_cpu:.1f} s of the same "
          f"{os.cpu_count()} cores")
    # Where the server is not on this machine (real S3), the job's own CPU bounds the rate.
    print(f"ingest with the server's CPU elsewhere (estimate: rate x (job+server CPU)/job CPU) "
          f"{ingest_rate * (ingest_cpu + server_cpu) / ingest_cpu:8.1f} images/s, ratio "
          f"{ingest_rate * (ingest_cpu + server_cpu) / ingest_cpu / raw_rate:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
