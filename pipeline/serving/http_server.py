"""The local endpoint's HTTP server: uvicorn (h11) with limits for slow and hostile clients.

uvicorn closes idle kept-alive connections (timeout_keep_alive), caps open connections
(limit_concurrency) and header size (h11_max_incomplete_event_size), but it has no deadline for
a request's headers: a client that connects and trickles header bytes holds its connection
forever. GuardedH11 adds that deadline; the app itself bounds the body (ServingSettings).

On SIGTERM or Ctrl-C the server drains: requests already admitted finish (the graceful
shutdown waits as long as a request may take: its body deadline plus its answer deadline),
requests that arrive meanwhile get 503 with Retry-After, never a 500.

`python -m pipeline.serving.http_server ARTIFACT --fd N` serves on a socket the caller already bound
(tests and benchmarks: no port picked, released and raced for). Every ServingSettings field is an
option, the capture's too: `--capture-dir DIR` turns the data capture on (pipeline/serving/capture.py).
"""
from __future__ import annotations

import argparse
import json
import logging
import socket
import sys
from dataclasses import fields
from pathlib import Path

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from pipeline.serving.capture import CaptureError
from pipeline.serving.endpoint import ServingSettings, create_app
from pipeline.serving.threads import passive_openmp_waits

log = logging.getLogger("invmon.endpoint")


class GuardedH11(H11Protocol):
    """h11 with a deadline for the request line and headers of every request on a connection."""

    header_timeout_s = 10.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._header_timer = None
        self._arm()  # a connection that never sends a byte is closed too

    def _between_requests(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def data_received(self, data: bytes) -> None:
        if self._between_requests():
            self._arm()  # these bytes begin a request: its headers are now on the clock
        super().data_received(data)
        if not self._between_requests():
            self._disarm()  # headers complete: the app's body and request timeouts take over

    def _too_slow(self) -> None:
        self._header_timer = None
        if self._between_requests() and not self.transport.is_closing():
            host, port = self.client or ("-", "-")
            log.info('%s:%s closed: no complete request headers within %g s', host, port,
                     self.header_timeout_s)
            self.transport.close()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)


class Draining:
    """ASGI wrapper: once shutdown has begun, a new request is answered 503 with Retry-After
    (JSON, connection closed) while the requests already admitted finish."""

    def __init__(self, app, retry_after_s: int = 1):
        self.app, self.retry_after_s = app, retry_after_s
        self.draining = False

    async def __call__(self, scope, receive, send) -> None:
        if self.draining and scope["type"] == "http":
            body = json.dumps({"error": "the server is shutting down; retry shortly"}).encode()
            await send({"type": "http.response.start", "status": 503, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                (b"retry-after", str(self.retry_after_s).encode()), (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": body})
            log.info('%s "%s %s" 503 (shutting down)', _client(scope), scope.get("method"), scope.get("path"))
            return
        await self.app(scope, receive, send)


def _client(scope) -> str:
    host, port = scope.get("client") or ("-", "-")
    return f"{host}:{port}"


class DrainingServer(uvicorn.Server):
    """uvicorn's server, telling the app when a shutdown signal arrives (before it stops)."""

    def __init__(self, config: uvicorn.Config, gate: Draining):
        super().__init__(config)
        self.gate = gate

    def handle_exit(self, sig, frame) -> None:
        if not self.gate.draining:
            log.info("shutting down: finishing the requests in progress (up to %g s), refusing new ones",
                     self.config.timeout_graceful_shutdown)
        self.gate.draining = True
        super().handle_exit(sig, frame)


def graceful_timeout_s(settings: ServingSettings) -> float:
    """How long a shutdown waits for admitted requests: the longest one may take to arrive and
    be answered (past that it would have been a 503 anyway), plus a second to send it."""
    return settings.body_timeout_s + settings.request_timeout_s + 1.0


def uvicorn_config(app, settings: ServingSettings, log_level: str = "info") -> uvicorn.Config:
    protocol = type("GuardedH11", (GuardedH11,), {"header_timeout_s": settings.header_timeout_s})
    return uvicorn.Config(
        app, http=protocol, log_level=log_level, access_log=False,  # AccessLog writes one line
        timeout_keep_alive=settings.keep_alive_s, limit_concurrency=settings.max_connections,
        h11_max_incomplete_event_size=16 * 1024,
        # Never shorter than a request may take: a request cut off by this becomes a 500.
        timeout_graceful_shutdown=graceful_timeout_s(settings),
    )


def configure_logging() -> None:
    logger = logging.getLogger("invmon.endpoint")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def serve(artifact, host: str = "127.0.0.1", port: int = 8080, model_version: str | None = None,
          settings: ServingSettings | None = None, sock: socket.socket | None = None) -> int:
    """Serve until interrupted. The port is bound at once; /ping says 503 until the model is
    loaded, and a model that fails to load stops the server (exit status 1)."""
    configure_logging()
    passive_openmp_waits()  # before the model's torch is imported (threads.py says why)
    settings = settings or ServingSettings()
    failed = []
    server: uvicorn.Server | None = None

    def stop(exc) -> None:
        failed.append(exc)
        if server is not None:
            server.should_exit = True

    app = Draining(create_app(artifact, model_version, settings=settings, background_load=True,
                              on_load_failure=stop), settings.retry_after_s)
    server = DrainingServer(uvicorn_config(app, settings), app)
    if sock is None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    host, port = sock.getsockname()[:2]
    log.info("serving %s on http://%s:%s (GET /ping, POST /invocations); max batch %d, "
             "max wait %g ms, queue %d", artifact, host, port, settings.max_batch,
             settings.max_wait_ms, settings.max_queue)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown
        pass
    return 1 if failed else 0


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """--max-batch, --max-wait-ms, ... one per ServingSettings field."""
    for field in fields(ServingSettings):
        parser.add_argument("--" + field.name.replace("_", "-"), type=type(field.default),
                            default=field.default, help=f"default {field.default!r}")


def settings_from(args) -> ServingSettings:
    return ServingSettings(**{f.name: getattr(args, f.name) for f in fields(ServingSettings)})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.serving.http_server")
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--fd", type=int, help="serve on this already bound socket")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--model-version")
    add_settings_arguments(parser)
    args = parser.parse_args(argv)
    sock = socket.socket(fileno=args.fd) if args.fd is not None else None
    try:
        return serve(args.artifact, args.host, args.port, args.model_version, settings_from(args), sock)
    except CaptureError as exc:  # a capture setting out of range, a folder that cannot be made
        print(f"cannot serve: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
