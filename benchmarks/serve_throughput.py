"""Local endpoint throughput and latency against the model's raw forward rate, in one run.

    python benchmarks/serve_throughput.py            (make bench-serve)

Starts the real server (`python -m pipeline.serving.http_server`, on a socket bound here) with the
local profile's network (EfficientNet-Lite0 at 160 px; random weights: speed does not depend on
them, or --artifact for a trained one), sends real photos (../shared/data/abid-sample, else generated
ones) from 1, 4 and 16 concurrent keep-alive clients, and measures in the same run the bare
forward pass of the same model on preloaded tensors at batch 1, 4 and 16. The server and the
raw measurement never run at the same time, and each round alternates them, so machine noise
hits both alike; on a shared machine compare the ratios, not the absolute numbers.

The served numbers include what the raw ones do not: HTTP, JPEG decoding and resizing.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from pipeline.local.jobs import tar_model
from trainer.artifact import write_untrained

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT.parent / "shared" / "data" / "abid-sample"


def make_artifact(dest: Path, arch: str = "efficientnet_lite0", image_size: int = 160) -> Path:
    """model.tar.gz of train.py's network with random weights, written and packed as a Train job's."""
    model_dir = write_untrained(dest / "model", ["--arch", arch, "--image_size", str(image_size)],
                                model_id=f"bench-{arch}-{image_size}")
    return tar_model(model_dir, dest / "model.tar.gz")


def photo_bodies(n: int) -> list[bytes]:
    if SAMPLE.is_dir():
        paths = sorted(SAMPLE.glob("*/*.jpg"))
        step = max(1, len(paths) // n)
        return [p.read_bytes() for p in paths[::step][:n]]
    rng = np.random.default_rng(0)
    bodies = []
    for _ in range(n):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (400, 500, 3), dtype=np.uint8)).save(buffer, "JPEG")
        bodies.append(buffer.getvalue())
    return bodies


# --------------------------------------------------------------------------- a light client
# A raw asyncio HTTP/1.1 client: on 2 shared cores, the client's own CPU is taken from the
# server, so it must cost as little as possible (httpx costs several times more per request).


async def one_client(port: int, bodies: list[bytes], stop_at: float, latencies: list[float],
                     offset: int, max_requests: int | None = None) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    requests = [b"POST /invocations HTTP/1.1\r\nHost: bench\r\nContent-Type: image/jpeg\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body) + body for body in bodies]
    done = 0
    try:
        while time.perf_counter() < stop_at and (max_requests is None or done < max_requests):
            started = time.perf_counter()
            writer.write(requests[(offset + done) % len(requests)])
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            if status != 200:
                raise RuntimeError(f"server answered {status}")
            latencies.append(time.perf_counter() - started)
            done += 1
    finally:
        writer.close()
    return done


async def load(port: int, bodies: list[bytes], clients: int, seconds: float) -> tuple[float, list]:
    latencies: list[float] = []
    started = time.perf_counter()
    counts = await asyncio.gather(*[one_client(port, bodies, started + seconds, latencies, i * 7)
                                    for i in range(clients)])
    return sum(counts) / (time.perf_counter() - started), latencies


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", type=Path, help="a model.tar.gz (default: Lite0 at 160 px)")
    parser.add_argument("--seconds", type=float, default=4.0, help="per load level and round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--latency-seconds", type=float, default=8.0,
                        help="one client, one request at a time, per round")
    parser.add_argument("--levels", default="1,4,16", help="client counts = batch sizes compared")
    parser.add_argument("--max-batch", type=int, default=None)
    parser.add_argument("--max-wait-ms", type=float, default=None)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    from pipeline.serving.bulk import raw_forward_rate
    from pipeline.serving.endpoint import load_model

    work = Path(tempfile.mkdtemp(prefix="invmon-bench-"))
    artifact = args.artifact or make_artifact(work)
    bodies = photo_bodies(64)
    model = load_model(artifact)
    images = [model.decode(body, "image/jpeg") for body in bodies[:16]]

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(256)
    port = sock.getsockname()[1]
    command = [sys.executable, "-m", "pipeline.serving.http_server", str(artifact), "--fd", str(sock.fileno())]
    if args.max_batch:
        command += ["--max-batch", str(args.max_batch)]
    if args.max_wait_ms is not None:
        command += ["--max-wait-ms", str(args.max_wait_ms)]
    log = open(work / "server.log", "wb")
    server = subprocess.Popen(command, pass_fds=[sock.fileno()], stdout=log, stderr=log)
    try:
        import httpx

        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ping", timeout=30).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("server did not start:\n" + (work / "server.log").read_text())
            time.sleep(0.2)
        asyncio.run(load(port, bodies, 4, 2.0))  # warm-up: first batches allocate

        levels = tuple(int(level) for level in args.levels.split(","))
        raw = {b: [] for b in levels}
        served = {c: [] for c in levels}
        latencies: list[float] = []
        for round_ in range(args.rounds):
            for level in levels:
                raw[level].append(raw_forward_rate(model, images, level, seconds=args.seconds / 2))
                rate, _ = asyncio.run(load(port, bodies, level, args.seconds))
                served[level].append(rate)
            lat: list[float] = []
            asyncio.run(one_client(port, bodies, time.perf_counter() + args.latency_seconds, lat,
                                   round_))
            latencies += lat
            print(f"round {round_ + 1}: raw {', '.join(f'b{b} {raw[b][-1]:.0f}' for b in levels)} img/s; "
                  f"served {', '.join(f'c{c} {served[c][-1]:.0f}' for c in levels)} req/s", flush=True)
    finally:
        server.send_signal(2)  # SIGINT: uvicorn shuts down cleanly and logs its batch count
        server.wait(30)
        sock.close()
        log.close()
    server_log = (work / "server.log").read_text()
    tracebacks = "Traceback" in server_log
    if tracebacks:
        print("server log has a traceback; its last lines:\n" + "\n".join(server_log.splitlines()[-30:]))

    p50, p99 = percentile(latencies, 50) * 1000, percentile(latencies, 99) * 1000
    results = {"p50_ms": p50, "p99_ms": p99, "p99_over_p50": p99 / p50, "levels": {}}
    print(f"\nmodel {model.model_version}; {len(bodies)} photos from "
          f"{'the ABID sample' if SAMPLE.is_dir() else 'a generator'}; {os.cpu_count()} CPUs; "
          f"medians of {args.rounds} rounds of {args.seconds:g} s")
    print(f"latency at 1 client: p50 {p50:.1f} ms, p99 {p99:.1f} ms (p99/p50 {p99 / p50:.2f}; goal <= 2)")
    print(f"{'clients':>8} {'served req/s':>13} {'raw forward img/s':>18} {'(batch)':>8} {'ratio':>6}")
    for level in levels:
        s, r = statistics.median(served[level]), statistics.median(raw[level])
        results["levels"][level] = {"served_rps": s, "raw_ips": r, "ratio": s / r}
        print(f"{level:>8} {s:>13.1f} {r:>18.1f} {level:>8} {s / r:>6.2f}")
    top = max(levels)
    print(f"goal: >= 0.80 of the raw batched rate at {top} clients: {results['levels'][top]['ratio']:.2f}")
    print("server: " + " ".join(line.split(" ", 2)[-1] for line in server_log.splitlines()
                                if "forward passes" in line))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
