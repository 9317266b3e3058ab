"""Local endpoint latency and throughput against the model's raw speed, in one run.

    python benchmarks/serve_throughput.py              (make bench-serve)
    python benchmarks/serve_throughput.py --capture    (make bench-serve ARGS=--capture)

Starts the real server (`python -m pipeline.serving.http_server`, on a socket bound here) with the
local profile's network (EfficientNet-Lite0 at 160 px; random weights: speed does not depend on
them, or --artifact for a trained one) and sends real photos (../shared/data/abid-sample, else
generated ones). In the same process it measures the raw baselines on the same photos:

- one client: each request's latency, against `input_fn` + `predict_fn` of the same photo in this
  process (what the model needs for one photo). Served and raw alternate in blocks of about a
  second, the first of each block dropped, so both see the same machine;
- 1, 4 and 16 concurrent keep-alive clients: requests/s, against the bare forward pass on
  preloaded tensors at batch 1, 4 and 16.

The server and the raw measurement never run at the same time, and each round of each level
runs raw, the server(s), the server(s) in reverse order, raw again, so a shared machine's noise
hits every side alike: compare the ratios, not the absolute numbers, and look at their spread
over the rounds. With --capture a second server, the same one with data capture on (to a
temporary folder), takes its turn beside the first, for the capture-on/off ratio.
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

# Both sides wait for OpenMP work passively: the server sets this itself before torch loads
# (pipeline/serving/threads.py), and the raw baseline here must run the same way (trainer's
# import would set it too). An OMP_WAIT_POLICY already in the environment applies to both.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402
from PIL import Image  # noqa: E402
from pipeline.local.jobs import tar_model  # noqa: E402
from pipeline.serving.bulk import raw_forward  # noqa: E402
from trainer.artifact import write_untrained  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT.parent / "shared" / "data" / "abid-sample"
BLOCK_S = 1.0  # one client's latency: served and raw alternate in blocks this long


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


class Server:
    """The real server in a subprocess, on a socket bound here."""

    def __init__(self, artifact: Path, work: Path, name: str, options: list[str], env: dict[str, str]):
        self.name, self.log_path = name, work / f"server-{name}.log"
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(256)
        self.port = self.sock.getsockname()[1]
        command = [sys.executable, "-m", "pipeline.serving.http_server", str(artifact),
                   "--fd", str(self.sock.fileno()), *options]
        self.log = open(self.log_path, "wb")
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, pass_fds=[self.sock.fileno()],
                                        stdout=self.log, stderr=self.log)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/ping", timeout=30).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server {self.name} did not start:\n" + self.log_path.read_text())
            time.sleep(0.2)

    def cpu_seconds(self) -> float:
        """The server process's CPU time so far (all its threads)."""
        times = psutil.Process(self.process.pid).cpu_times()
        return times.user + times.system

    def ping(self) -> dict:
        return httpx.get(f"http://127.0.0.1:{self.port}/ping", timeout=30).json()

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.send_signal(2)  # SIGINT: uvicorn shuts down cleanly and logs its batch count
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.sock.close()
        self.log.close()
        return self.log_path.read_text(errors="replace")


def raw_single(model, body: bytes) -> float:
    """Seconds for input_fn + predict_fn of one photo, in this process: what the model needs."""
    started = time.perf_counter()
    model.inference.predict_fn(model.inference.input_fn(body, "image/jpeg"), model.model)
    return time.perf_counter() - started


def latency_blocks(servers: list[Server], model, bodies: list[bytes], seconds: float, first: int,
                   served: dict[str, list[float]], raw: list[float]) -> None:
    """One client, one request at a time: each server's block, then the raw block, until
    `seconds` have passed; the first request of each block (a machine just switched) is dropped."""
    stop_at = time.perf_counter() + seconds
    block = 0
    while time.perf_counter() < stop_at:
        for server in servers:
            latencies: list[float] = []
            asyncio.run(one_client(server.port, bodies, time.perf_counter() + BLOCK_S, latencies,
                                   first + block * 11))
            served[server.name] += latencies[1:]
        block_end, i = time.perf_counter() + BLOCK_S, 0
        while time.perf_counter() < block_end or i < 2:
            took = raw_single(model, bodies[(first + block * 11 + i) % len(bodies)])
            if i:
                raw.append(took)
            i += 1
        block += 1


def level_round(servers: list[Server], model, images: list, bodies: list[bytes], level: int,
                seconds: float) -> dict[str, tuple[float, float]]:
    """One round of one load level: raw, each server, each server in reverse order, raw again
    (ABBA: a machine getting busier or quieter during the round weighs on every side alike).
    Each server gets `seconds` in two halves, raw half that. For each side: (requests or images
    per second, CPU ms per request or image: the server process's own, this process's for raw)."""
    totals = {name: [0, 0.0, 0.0] for name in ["raw"] + [server.name for server in servers]}
    for side in ["raw"] + servers + servers[::-1] + ["raw"]:
        if side == "raw":
            done, took, cpu = raw_forward(model, images, level, seconds / 4)
        else:
            cpu, started = side.cpu_seconds(), time.perf_counter()
            rate, _ = asyncio.run(load(side.port, bodies, level, seconds / 2))
            took = time.perf_counter() - started
            done, cpu = round(rate * took), side.cpu_seconds() - cpu
        total = totals["raw" if side == "raw" else side.name]
        total[0] += done
        total[1] += took
        total[2] += cpu
    return {name: (done / took, 1000 * cpu / max(done, 1)) for name, (done, took, cpu) in totals.items()}


def spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", type=Path, help="a model.tar.gz (default: Lite0 at 160 px)")
    parser.add_argument("--seconds", type=float, default=4.0, help="per load level and round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--latency-seconds", type=float, default=8.0,
                        help="one client, served and raw alternating, per round")
    parser.add_argument("--levels", default="1,4,16", help="client counts = batch sizes compared")
    parser.add_argument("--capture", action="store_true",
                        help="also a server with capture on (to a temporary folder): on/off ratios")
    parser.add_argument("--max-batch", type=int, default=None)
    parser.add_argument("--max-wait-ms", type=float, default=None)
    parser.add_argument("--server-option", action="append", default=[], metavar="OPTION",
                        help="passed to the server, e.g. --server-option=--decode-workers=2 "
                             "(repeatable)")
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                        help="set in the server's environment only; NAME= removes it (repeatable)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    env = dict(os.environ)
    for setting in args.server_env:
        name, _, value = setting.partition("=")
        if not name:
            parser.error(f"--server-env {setting!r}: expected NAME=VALUE")
        if value:
            env[name] = value
        else:
            env.pop(name, None)

    from pipeline.serving.endpoint import load_model

    work = Path(tempfile.mkdtemp(prefix="invmon-bench-"))
    artifact = args.artifact or make_artifact(work)
    bodies = photo_bodies(64)
    model = load_model(artifact)
    images = [model.decode(body, "image/jpeg") for body in bodies[:16]]
    options = list(args.server_option)
    if args.max_batch:
        options += ["--max-batch", str(args.max_batch)]
    if args.max_wait_ms is not None:
        options += ["--max-wait-ms", str(args.max_wait_ms)]
    servers = [Server(artifact, work, "off", options, env)]
    if args.capture:
        capture = ["--capture-dir", str(work / "capture")]
        servers.append(Server(artifact, work, "on", options + capture, env))
    names = [server.name for server in servers]
    levels = tuple(int(level) for level in args.levels.split(","))
    raw = {b: [] for b in levels}
    served = {(name, c): [] for name in names for c in levels}
    cpu = {(name, c): [] for name in ["raw"] + names for c in levels}  # CPU ms per request/image
    lat_served: dict[str, list[float]] = {name: [] for name in names}
    lat_raw: list[float] = []
    pings: dict[str, dict] = {}
    logs: dict[str, str] = {}
    try:
        for server in servers:
            server.wait_ready()
            asyncio.run(load(server.port, bodies, 4, 2.0))  # warm-up: first batches allocate
        for _ in range(20):
            raw_single(model, bodies[0])
        for round_ in range(args.rounds):
            for level in levels:
                measured = level_round(servers, model, images, bodies, level, args.seconds)
                raw[level].append(measured["raw"][0])
                cpu["raw", level].append(measured["raw"][1])
                for name in names:
                    served[name, level].append(measured[name][0])
                    cpu[name, level].append(measured[name][1])
            latency_blocks(servers, model, bodies, args.latency_seconds, round_ * 5, lat_served, lat_raw)
            line = "; ".join(f"served{'' if s.name == 'off' else ' with capture'} "
                             + ", ".join(f"c{c} {served[s.name, c][-1]:.0f}" for c in levels)
                             for s in servers)
            raws = ", ".join(f"b{b} {raw[b][-1]:.0f}" for b in levels)
            print(f"round {round_ + 1}: raw {raws} img/s; {line} req/s", flush=True)
        pings = {server.name: server.ping() for server in servers}
    finally:
        logs = {server.name: server.stop() for server in servers}
    for name, text in logs.items():
        if "Traceback" in text:
            print(f"server {name}'s log has a traceback; its last lines:\n"
                  + "\n".join(text.splitlines()[-30:]))

    results: dict = {"cpus": os.cpu_count(), "rounds": args.rounds, "one_client": {}, "levels": {}}
    print(f"\nmodel {model.model_version}; {len(bodies)} photos from "
          f"{'the ABID sample' if SAMPLE.is_dir() else 'a generator'}; {os.cpu_count()} CPUs; "
          f"{args.rounds} rounds of {args.seconds:g} s per level and server, "
          f"{args.latency_seconds:g} s of one client")

    raw_p50, raw_p99 = percentile(lat_raw, 50) * 1000, percentile(lat_raw, 99) * 1000
    print(f"\none client, one request at a time ({len(lat_raw)} raw, "
          f"{', '.join(str(len(v)) for v in lat_served.values())} served):")
    print(f"{'':>32} {'p50 ms':>7} {'p99 ms':>7} {'p99/p50':>8}")
    print(f"{'raw input_fn + predict_fn':>32} {raw_p50:>7.1f} {raw_p99:>7.1f} {raw_p99 / raw_p50:>8.2f}")
    results["one_client"]["raw"] = {"p50_ms": raw_p50, "p99_ms": raw_p99}
    for name in names:
        p50, p99 = percentile(lat_served[name], 50) * 1000, percentile(lat_served[name], 99) * 1000
        label = "served" if name == "off" else "served, capture on"
        print(f"{label:>32} {p50:>7.1f} {p99:>7.1f} {p99 / p50:>8.2f}")
        results["one_client"][name] = {"p50_ms": p50, "p99_ms": p99, "p99_over_p50": p99 / p50,
                                       "over_raw_ms": p50 - raw_p50, "raw_over_served": raw_p50 / p50}
    off = results["one_client"]["off"]
    print(f"goal: served p50 <= raw + 10 ms: {off['over_raw_ms']:+.1f} ms; "
          f"raw/served {off['raw_over_served']:.2f} (>= 0.6); p99/p50 {off['p99_over_p50']:.2f} (<= 2)")

    print("\nrates: medians over the rounds, each round's ratio beside them; CPU: ms per request "
          "(the server process) or per image (the raw forward pass), medians")
    print(f"{'clients':>8} {'served req/s':>13} {'raw forward img/s':>18} {'(batch)':>8} "
          f"{'ratio':>6} {'rounds':>10} {'CPU served':>10} {'raw':>5}"
          + ("  capture on/off: rate (rounds), CPU" if args.capture else ""))
    for level in levels:
        s, r = statistics.median(served["off", level]), statistics.median(raw[level])
        ratios = [a / b for a, b in zip(served["off", level], raw[level])]
        cs, cr = statistics.median(cpu["off", level]), statistics.median(cpu["raw", level])
        row = {"served_rps": s, "raw_ips": r, "ratio": s / r, "round_ratios": ratios,
               "served_cpu_ms": cs, "raw_cpu_ms": cr}
        line = (f"{level:>8} {s:>13.1f} {r:>18.1f} {level:>8} {s / r:>6.2f} {spread(ratios):>10} "
                f"{cs:>10.1f} {cr:>5.1f}")
        if args.capture:
            on = statistics.median(served["on", level])
            by_round = [a / b for a, b in zip(served["on", level], served["off", level])]
            con = statistics.median(cpu["on", level])
            row.update(capture_on_rps=on, capture_on_over_off=on / s, capture_round_ratios=by_round,
                       capture_on_cpu_ms=con)
            line += f"  {on / s:.2f} ({spread(by_round)}), {con / cs:.2f}"
        results["levels"][level] = row
        print(line)
    top = max(levels)
    print(f"goal: >= 0.80 of the raw batched rate at {top} clients: "
          f"{results['levels'][top]['ratio']:.2f}")
    if args.capture:
        capture = pings.get("on", {}).get("capture", {})
        results["capture"] = capture
        print(f"goal: capture on >= 0.95 of off at {top} clients: "
              f"{results['levels'][top]['capture_on_over_off']:.2f}; the capture wrote "
              f"{capture.get('written', '?')} records, dropped {capture.get('dropped', '?')}")
    for name, text in logs.items():
        print(f"server {name}: " + " ".join(line.split(" ", 2)[-1] for line in text.splitlines()
                                           if "forward passes" in line))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
