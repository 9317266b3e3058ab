"""The local endpoint: the model artifact served over HTTP like a SageMaker real-time endpoint.

    GET  /ping          -> 200 {"status": "ok", "model_version": ..., "in_flight": n, "queued": n}
                           (+ "capture": written and dropped counts, when capture is on);
                           503 until the model is loaded
    POST /invocations   image/jpeg | image/png | application/x-image body
                        -> 200 {"count": n, "probabilities": {...}, "model_version": ...}

The artifact is loaded through its own `code/inference.py` (model_fn, input_fn, predict_fn,
output_fn), the same functions the Evaluate step and the SageMaker endpoint use. Bad input
always gets a 4xx with a JSON body `{"error": "..."}`: 415 content type, 406 Accept, 413 size,
400 empty or undecodable body, 408 a body that does not arrive in time; overload a 503 with
Retry-After (too many requests in progress, or no answer within the request timeout). The
errors inference.py raises carry their status (`status_code`, as the SageMaker toolkit's do)
and are answered with it, so both servers give the same code for the same request.

How a request is served: admitted (or 503) before its body is read; body read under a deadline;
input_fn in a small decode pool; then its image joins a micro-batch and predict_fn scores the
whole batch as one list (pipeline/serving/batching.py). A client that leaves has its work dropped.
ServingSettings holds every limit; pipeline/serving/http_server.py runs it under uvicorn.

With `capture_dir` set, every answered request (or a sampled share) is also captured for drift
monitoring (pipeline/serving/capture.py): the embedding comes from the same forward pass, the
record is written by a thread of its own, and nothing of it can slow or fail the answer.
"""
from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import os
import shutil
import stat
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from types import ModuleType

import httpx
import psutil
from fastapi import FastAPI, Request
from PIL import Image
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from pipeline.serving import threads
from pipeline.serving.batching import MicroBatcher, PixelBudget
from pipeline.serving.capture import Capture, Captured, from_settings as capture_from_settings

JSON = "application/json"
MAX_BODY_BYTES = 10 * 1024 * 1024
DEFAULT_CONTENT_TYPES = ("image/jpeg", "image/png", "application/x-image")
CONTENT_TYPE_BY_SUFFIX = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}
log = logging.getLogger("invmon.endpoint")


class ArtifactError(Exception):
    """The model artifact cannot be found, extracted or loaded."""


class EndpointError(Exception):
    """A remote endpoint could not be reached or refused the request (message says why)."""


class RequestError(Exception):
    """A bad request: becomes `status` with a JSON `{"error": message}` body."""

    def __init__(self, status: int, message: str, retry_after: int | None = None,
                 close: bool = False):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = {}
        if retry_after is not None:  # 503s say when to come back, as SageMaker's throttling does
            self.headers["Retry-After"] = str(retry_after)
        if close:  # a client too slow to send its body does not get to keep the connection
            self.headers["Connection"] = "close"


# --------------------------------------------------------------------------- loading


def _safe_extract(tarball: Path, dest: Path) -> None:
    """Extract model.tar.gz, refusing absolute paths, '..' and links (nothing outside dest)."""
    try:
        with tarfile.open(tarball, "r:*") as tar:
            for member in tar.getmembers():
                name = PurePosixPath(member.name)
                if name.is_absolute() or ".." in name.parts:
                    raise ArtifactError(f"{tarball}: unsafe member path {member.name!r}")
                if not (member.isfile() or member.isdir()):
                    raise ArtifactError(f"{tarball}: member {member.name!r} is not a plain "
                                        "file or folder")
            tar.extractall(dest, filter="data")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ArtifactError(f"{tarball}: not a readable model.tar.gz ({exc})") from None


_import_lock = threading.Lock()
_import_count = 0


def _import_inference(code_dir: Path) -> ModuleType:
    """Import the artifact's code/inference.py under a name of its own, so that two apps in one
    process (two model versions) never share a module."""
    global _import_count
    path = code_dir / "inference.py"
    if not path.is_file():
        raise ArtifactError("the model artifact has no code/inference.py (the serving code)")
    with _import_lock:
        _import_count += 1
        name = f"invmon_artifact_inference_{_import_count}"
        if str(code_dir) not in sys.path:
            sys.path.insert(0, str(code_dir))  # as the serving container does
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise ArtifactError(f"code/inference.py failed to import "
                                f"({type(exc).__name__}: {exc})") from None
    for fn in ("model_fn", "input_fn", "predict_fn", "output_fn"):
        if not callable(getattr(module, fn, None)):
            raise ArtifactError(f"code/inference.py in the artifact defines no {fn}()")
    return module


@dataclass
class LoadedModel:
    """An artifact loaded through its serving functions; what the endpoint answers with."""

    inference: ModuleType
    model: object
    model_version: str
    content_types: tuple[str, ...]
    workdir: tempfile.TemporaryDirectory | None  # extracted files live as long as this
    presize: int | None = None  # see early_resize_side()
    model_id: str | None = None  # model_config.json's, what a baseline names (the version may be a label)

    @property
    def side(self) -> int | None:
        """The square the model sees photos at (model_config.json's image_size)."""
        config = self.model.get("config") if isinstance(self.model, dict) else None
        try:
            return int(config["image_size"])
        except (TypeError, KeyError, ValueError):
            return None

    @property
    def statistics(self):
        """The artifact's photos.statistics (None in an artifact made before it existed)."""
        found = getattr(getattr(self.inference, "photos", None), "statistics", None)
        return found if callable(found) else None

    @property
    def invalid_input(self) -> type[Exception]:
        return getattr(self.inference, "InvalidInput", ValueError)

    def refused(self, exc: Exception, default: int) -> RequestError:
        """The artifact's own error as the answer: the status it carries (inference.py's errors
        have `status_code`, as the SageMaker toolkit's do), else `default` (older artifacts)."""
        status = getattr(exc, "status_code", None)
        if not (isinstance(status, int) and 400 <= status < 500):
            status = default
        return RequestError(status, getattr(exc, "message", None) or str(exc))

    def decode(self, body: bytes, content_type: str):
        """input_fn: body -> image, or RequestError (its status, 400 by default) naming what is
        wrong with it."""
        try:
            image = self.inference.input_fn(body, content_type)
        except self.invalid_input as exc:
            raise self.refused(exc, 400) from None
        if self.presize and isinstance(image, Image.Image):
            # predict_fn's own resize, done here in the decode threads: in parallel with the
            # forward pass instead of before it, and a waiting image holds 96x96, not 16 MP.
            image = image.convert("RGB").resize((self.presize, self.presize), Image.BILINEAR)
        return image

    def decode_kept(self, body: bytes, content_type: str):
        """decode, and the photo at the model's side for the capture: (image, small image). The
        early-resized photo is that already; otherwise it is resized here, in the decode thread."""
        image = self.decode(body, content_type)
        side = self.side
        if self.presize or not side or not isinstance(image, Image.Image):
            return image, image
        return image, image.convert("RGB").resize((side, side), Image.BILINEAR)

    def predict_batch(self, images: list, embed: bool = False) -> list:
        """predict_fn on a list: one forward pass for the whole batch. With `embed` (capture on),
        (prediction, embedding) pairs from that same pass, through the artifact's
        predict_and_embed (the embedding is None for an artifact that has none)."""
        embedder = getattr(self.inference, "predict_and_embed", None) if embed else None
        if callable(embedder):
            predictions, embeddings = embedder(list(images), self.model)
        else:
            predictions, embeddings = self.inference.predict_fn(list(images), self.model), None
        for prediction in predictions:
            if isinstance(prediction, dict):
                prediction["model_version"] = self.model_version
        if not embed:
            return predictions
        rows = list(embeddings) if embeddings is not None else [None] * len(predictions)
        return list(zip(predictions, rows))

    def render(self, prediction, accept: str = JSON) -> str:
        try:
            return self.inference.output_fn(prediction, accept)
        except self.invalid_input as exc:
            raise self.refused(exc, 406) from None

    def predict(self, body: bytes, content_type: str, accept: str = JSON) -> str:
        """Raw request body -> response text, exactly the endpoint's path. Raises RequestError."""
        try:
            image = self.inference.input_fn(body, content_type)
        except self.invalid_input as exc:
            raise self.refused(exc, 400) from None
        try:
            prediction = self.inference.predict_fn(image, self.model)
        except self.invalid_input as exc:
            raise self.refused(exc, 400) from None
        if isinstance(prediction, dict):
            prediction["model_version"] = self.model_version
        return self.render(prediction, accept)


# An extracted artifact lives as long as its server; a server killed outright (SIGKILL, the OOM
# killer) leaves it behind, so the next one removes the folders of servers that are gone.
WORKDIR_PREFIX = "invmon-endpoint-"


def remove_stale_workdirs(root: Path | None = None) -> list[Path]:
    """Remove `<tmp>/invmon-endpoint-<pid>-*` folders of ours whose server process no longer
    exists (never a link, nor another user's folder in a shared /tmp)."""
    removed = []
    for folder in Path(root or tempfile.gettempdir()).glob(f"{WORKDIR_PREFIX}*-*"):
        pid = folder.name[len(WORKDIR_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or psutil.pid_exists(int(pid)):
            continue
        info = folder.lstat()
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def load_model(artifact: str | Path, model_version: str | None = None) -> LoadedModel:
    """Extract (if needed) and load an artifact: model.tar.gz, a folder holding it, or an
    already extracted artifact folder (with code/inference.py)."""
    artifact = Path(artifact)
    workdir = None
    if artifact.is_dir() and (artifact / "code" / "inference.py").is_file():
        model_dir = artifact
    else:
        tarball = artifact / "model.tar.gz" if artifact.is_dir() else artifact
        if not tarball.is_file():
            raise ArtifactError(f"no model artifact at {artifact} "
                                "(expected model.tar.gz or a folder holding it)")
        remove_stale_workdirs()
        workdir = tempfile.TemporaryDirectory(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-")
        model_dir = Path(workdir.name)
        _safe_extract(tarball, model_dir)
    inference = _import_inference(model_dir / "code")
    try:
        model = inference.model_fn(str(model_dir))
    except Exception as exc:
        raise ArtifactError(f"{artifact}: model_fn could not load it "
                            f"({type(exc).__name__}: {exc})") from None
    model_id = None
    try:
        model_id = json.loads((model_dir / "model_config.json").read_text()).get("model_id")
    except (OSError, ValueError, AttributeError):
        pass
    if model_version is None:
        model_version = model_id
    return LoadedModel(inference, model, str(model_version or "unknown"),
                       tuple(getattr(inference, "CONTENT_TYPES", DEFAULT_CONTENT_TYPES)), workdir,
                       early_resize_side(inference, model), model_id)


def early_resize_side(inference: ModuleType, model) -> int | None:
    """The side of the square predict_fn resizes photos to, when resizing them earlier is
    provably the same: the artifact's own views of a detailed photo (every TTA view, from its
    tta_views, or its to_pixels where it has none) must be identical for the photo and for that
    photo already resized (BILINEAR, whole photo). An inference.py that crops, resizes another way
    or also looks at the photo at another size (the crops of TestTimeAugmentation=flips+crops) fails
    the check, and its photos are passed on untouched."""
    config = model.get("config") if isinstance(model, dict) else None
    if not isinstance(config, dict) or "image_size" not in config:
        return None
    tta_views, to_pixels = getattr(inference, "tta_views", None), getattr(inference, "to_pixels", None)
    if callable(tta_views):
        views = lambda photo: tta_views([photo], config)  # noqa: E731
    elif callable(to_pixels):  # an artifact whose inference.py predates tta_views
        views = lambda photo: [to_pixels(photo, config)]  # noqa: E731
    else:
        return None
    try:
        side = int(config["image_size"])
        probe = Image.effect_mandelbrot((317, 241), (-2.0, -1.3, 0.8, 1.3), 64).convert("RGB")
        probe = Image.merge("RGB", (probe.getchannel(0), probe.rotate(90, expand=False).getchannel(0),
                                    probe.transpose(Image.FLIP_LEFT_RIGHT).getchannel(0)))
        early = probe.resize((side, side), Image.BILINEAR)
        full, short = views(probe), views(early)
        same = len(full) == len(short) and all(tuple(a.shape) == tuple(b.shape) and bool((a == b).all())
                                               for a, b in zip(full, short))
    except Exception:  # noqa: BLE001 - any doubt: do not resize early
        return None
    return side if same else None


# --------------------------------------------------------------------------- request checks


def _media_type(header: str | None) -> str:
    return (header or "").split(";")[0].strip().lower()


def negotiate(accept: str | None, model: "LoadedModel") -> str:
    """The answer's media type, JSON, if the artifact's own rule admits the Accept header (the
    rule its output_fn applies in the serving container, inference.acceptable); else 406 before
    any work. An artifact without the rule is left to its output_fn, which answers 406 itself."""
    rule = getattr(model.inference, "acceptable", None)
    if rule is None or rule(accept):
        return JSON
    raise RequestError(406, f"cannot answer with Accept {accept!r}; this endpoint answers {JSON}")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than `limit` bytes: by the declared Content-Length
    before reading anything, and by the bytes actually received (chunked or lying clients)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise RequestError(400, f"Content-Length {declared!r} is not a number of bytes")
        if int(declared) > limit:
            raise RequestError(413, f"body of {int(declared)} bytes is over the limit "
                                    f"of {limit} bytes")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise RequestError(413, f"body is over the limit of {limit} bytes")
    except ClientDisconnect:
        # An aborted upload is the client's business: one access-log line, no traceback.
        expected = f" of {declared}" if declared else ""
        raise ClientGone(f"aborted upload: client left after {len(body)}{expected} bytes") from None
    return bytes(body)


# --------------------------------------------------------------------------- the app


@dataclass(frozen=True)
class ServingSettings:
    """The local server's limits. Defaults measured on 2 CPU cores (docs/benchmarks.md, Serving)."""

    max_batch: int = 16           # images in one predict_fn call
    max_wait_ms: float = 5.0      # how long a batch waits for requests still decoding
    max_queue: int = 64           # requests admitted at once; past it 503 + Retry-After
    decode_workers: int = 0       # threads decoding bodies beside the forward pass; 0: threads.py's
    torch_threads: int = 0        # torch's intra-op threads; 0: OMP_NUM_THREADS, else every core
    decoded_megapixels: int = 48  # decoded pixels held at once (3 photos at the 16 MP budget)
    request_timeout_s: float = 30.0  # body received -> answer; past it 503 + Retry-After
    body_timeout_s: float = 10.0     # the whole body must arrive within this (slow clients)
    header_timeout_s: float = 10.0   # the request line and headers must arrive within this
    keep_alive_s: float = 5.0        # an idle kept-alive connection is closed after this
    max_connections: int = 256       # open connections (uvicorn limit_concurrency)
    max_body_bytes: int = MAX_BODY_BYTES
    retry_after_s: int = 1
    # Data capture for drift monitoring (capture.py, docs/monitoring.md); off unless a folder is set.
    capture_dir: str = ""             # the capture's folder; empty: no capture
    capture_sample: float = 1.0       # share of answered requests captured
    capture_body_sample: float = 0.0  # share of captured requests that keep the photo's bytes (base64)
    capture_file_mb: float = 16.0     # a capture file is closed and a new one begun past this
    capture_max_mb: float = 256.0     # the folder's capture files together; the oldest go past it
    capture_queue_mb: float = 32.0    # records waiting for the writer; past it new ones are dropped


class ClientGone(Exception):
    """The client closed the connection before the answer; nobody is left to answer."""

    def __init__(self, note: str):
        super().__init__(note)
        self.note = note


class ServingState:
    """What the app knows at run time: the model (once loaded), counters, pools."""

    def __init__(self, settings: ServingSettings):
        self.settings = settings
        self.model: LoadedModel | None = None
        self.load_error: str | None = None
        self.in_flight = 0
        self.batcher: MicroBatcher | None = None
        self.decode_pool: ThreadPoolExecutor | None = None
        self.pixels: PixelBudget | None = None
        self.capture: Capture | None = None

    def ready(self) -> LoadedModel:
        if self.model is not None:
            return self.model
        if self.load_error:
            raise RequestError(503, f"the model failed to load: {self.load_error}",
                               retry_after=None)
        raise RequestError(503, "the model is still loading", retry_after=self.settings.retry_after_s)


def note(request: Request, text: str) -> None:
    """Add to this request's access-log line (the one line it gets)."""
    request.scope["invmon.note"] = text


async def _client_left(request: Request) -> None:
    """Returns when the client disconnects (the body is already read; nothing else arrives)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _decode_and_predict(state: ServingState, model: LoadedModel, body: bytes,
                              content_type: str, arrived, keep: bool = False):
    """input_fn in the decode pool, then predict_fn in a micro-batch; or, for a lone request
    (the forward thread idle, nothing queued, nobody else on the way), both at once on the
    forward thread: no batch to wait for, two thread hand-offs fewer. Cancelling the task drops
    the work: a decode not yet started never starts, a queued image is left out of its batch.
    Decoded pixels held at once are bounded by state.pixels (memory, whatever the photos).
    Returns (what the batch gave, the photo at the model's side when `keep`, for the capture)."""
    loop = asyncio.get_running_loop()
    batcher = state.batcher
    decode = model.decode_kept if keep else model.decode
    # Reserve the most a photo may decode to; keep only its real size once decoded.
    reserved = 0
    try:
        most = int(getattr(model.inference, "MAX_PIXELS", 16_000_000))
        await state.pixels.acquire(most)
        reserved = most
        if batcher.free_for_one():
            arrived()  # no longer on its way to the queue: a batch forming now does not wait for it

            def decode_and_predict():
                image, kept = decode(body, content_type) if keep else (decode(body, content_type), None)
                return batcher.predict_batch([image])[0], kept

            return await batcher.run_alone(decode_and_predict)
        kept = None
        if keep:
            image, kept = await loop.run_in_executor(state.decode_pool, decode, body, content_type)
        else:
            image = await loop.run_in_executor(state.decode_pool, decode, body, content_type)
        width, height = getattr(image, "size", (0, 0))
        held = min(reserved, width * height)
        state.pixels.release(reserved - held)
        reserved = held
        future = batcher.submit(image)
        arrived()
        del image
        return await future, kept
    finally:
        state.pixels.release(reserved)


async def _answer(request: Request, state: ServingState, model: LoadedModel,
                  content_type: str, accept: str, arrived) -> Response:
    settings = state.settings
    try:
        body = await asyncio.wait_for(read_body(request, settings.max_body_bytes),
                                      settings.body_timeout_s)
    except asyncio.TimeoutError:
        raise RequestError(408, f"the request body did not arrive within {settings.body_timeout_s:g} s",
                           close=True) from None
    if not body:
        raise RequestError(400, "empty request body: send the bytes of a JPEG or PNG photo")
    capture, size = state.capture, len(body)
    take, keep_body = capture.wants() if capture is not None else (False, False)
    work = asyncio.ensure_future(_decode_and_predict(state, model, body, content_type, arrived, take))
    kept_body = body if keep_body else None
    del body
    watcher = asyncio.ensure_future(_client_left(request))
    try:
        done, _ = await asyncio.wait({work, watcher}, timeout=settings.request_timeout_s,
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if work in done:
        result, image = work.result()
        prediction, embedding = result if capture is not None else (result, None)
        answer = Response(model.render(prediction, accept), media_type=accept)
        if take:  # after the answer is made; offer() only appends to a bounded queue
            capture.offer(Captured(
                time.time(), _request_id(request), model.model_version, model.model_id, content_type,
                size, prediction, image=image, side=model.side, statistics=model.statistics,
                embedding=embedding, body=kept_body))
        return answer
    work.cancel()
    if watcher in done:
        raise ClientGone("client left before the answer; its work was dropped")
    raise RequestError(503, f"no answer within {settings.request_timeout_s:g} s (server busy)",
                       retry_after=settings.retry_after_s)


def _request_id(request: Request) -> str:
    """The client's X-Request-Id when it is a sane token, else a new one."""
    given = request.headers.get("x-request-id", "")
    if 0 < len(given) <= 128 and given.isprintable() and '"' not in given:
        return given
    return uuid.uuid4().hex


class AccessLog:
    """One log line per request: client, method, path, status, latency, and a note if any
    (an aborted upload, a client that left). 499 = the client closed the connection first."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = None

        async def send_and_see(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_see)
        finally:
            client = "%s:%s" % tuple(scope.get("client") or ("-", "-"))
            extra = scope.get("invmon.note")
            log.info('%s "%s %s" %s %.1f ms%s', client, scope["method"], scope["path"],
                     status or 500, (time.perf_counter() - started) * 1000,
                     f" ({extra})" if extra else "")


def create_app(artifact: str | Path, model_version: str | None = None,
               max_body_bytes: int | None = None, settings: ServingSettings | None = None,
               background_load: bool = False, on_load_failure=None) -> FastAPI:
    """The endpoint app. By default the model is loaded here, before the app exists; with
    `background_load` it loads after start-up and /ping answers 503 until it is ready."""
    settings = settings or ServingSettings()
    if max_body_bytes is not None:
        settings = replace(settings, max_body_bytes=max_body_bytes)
    state = ServingState(settings)
    state.capture = capture_from_settings(settings)  # CaptureError now, not after start-up

    def load() -> None:
        try:
            state.model = load_model(artifact, model_version)
            log.info("model %s loaded; ready", state.model.model_version)
        except ArtifactError as exc:
            state.load_error = str(exc)
            log.error("cannot serve: %s", exc)
            if on_load_failure is not None:
                on_load_failure(exc)

    if not background_load:
        state.model = load_model(artifact, model_version)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        plan = threads.plan(settings.torch_threads, settings.decode_workers)
        log.info("%d cores: %d torch threads for the forward pass, %d decode threads", plan.cores,
                 plan.torch_threads, plan.decode_workers)
        state.decode_pool = ThreadPoolExecutor(plan.decode_workers, thread_name_prefix="invmon-decode")
        state.pixels = PixelBudget(settings.decoded_megapixels * 1_000_000)
        embed = state.capture is not None
        state.batcher = MicroBatcher(lambda images: state.model.predict_batch(images, embed),
                                     settings.max_batch, settings.max_wait_ms / 1000,
                                     thread_init=lambda: threads.use_torch_threads(plan.torch_threads))
        state.batcher.start()
        if state.capture is not None:
            state.capture.start()
            log.info("capturing %g of the answered requests to %s", settings.capture_sample,
                     settings.capture_dir)
        if state.model is None:
            threading.Thread(target=load, name="invmon-model-load", daemon=True).start()
        try:
            yield
        finally:
            batcher = state.batcher
            if batcher.batches:
                log.info("%s", batcher.summary())
            await batcher.stop()
            state.decode_pool.shutdown(wait=False, cancel_futures=True)
            if state.capture is not None:  # what is queued is written (a few seconds at most)
                await asyncio.get_running_loop().run_in_executor(None, state.capture.stop)

    app = FastAPI(title="invmon bin-count endpoint", lifespan=lifespan)
    app.state.serving = state
    app.add_middleware(AccessLog)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, exc: ClientGone) -> Response:
        note(request, exc.note)  # nobody reads this answer; it only names the outcome in the log
        return Response(status_code=499)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Unknown routes and methods answer in the same {"error": ...} shape.
        return JSONResponse({"error": f"{request.method} {request.url.path}: {exc.detail}"},
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=422)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        # Only a fault of the server or model lands here; bad input is handled above.
        return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}"},
                            status_code=500)

    @app.get("/ping")
    async def ping() -> JSONResponse:
        if state.model is None:
            status = "failed" if state.load_error else "loading"
            return JSONResponse({"status": status, "error": state.load_error}, status_code=503,
                                headers={"Retry-After": str(settings.retry_after_s)})
        # The load beside the health: requests admitted (the --max-queue count) and decoded
        # photos waiting for a forward pass, for an operator watching a busy server.
        health = {"status": "ok", "model_version": state.model.model_version,
                  "in_flight": state.in_flight, "queued": state.batcher.queued}
        if state.capture is not None:  # what was written and what was dropped, by reason
            health["capture"] = state.capture.status()
        return JSONResponse(health)

    @app.post("/invocations")
    async def invocations(request: Request) -> Response:
        model = state.ready()
        content_type = request.headers.get("content-type")
        if not content_type:
            raise RequestError(415, "missing Content-Type header; "
                                    f"send one of {', '.join(model.content_types)}")
        if _media_type(content_type) not in model.content_types:
            raise RequestError(415, f"unsupported content type {content_type!r}; "
                                    f"send one of {', '.join(model.content_types)}")
        accept = negotiate(request.headers.get("accept"), model)
        # Admission before the body is read: past the limit nothing more is spent on it.
        if state.in_flight >= settings.max_queue:
            raise RequestError(503, f"server busy: {state.in_flight} requests in progress, "
                                    f"the limit is {settings.max_queue}; retry later",
                               retry_after=settings.retry_after_s)
        # From admission until its image is queued a request counts as "incoming": a batch
        # waits (up to max_wait) for incoming requests, never for an empty room.
        state.in_flight += 1
        state.batcher.incoming += 1
        pending = [True]

        def arrived() -> None:
            if pending:
                pending.pop()
                state.batcher.incoming -= 1

        try:
            return await _answer(request, state, model, content_type, accept, arrived)
        finally:
            arrived()
            state.in_flight -= 1

    return app


# --------------------------------------------------------------------------- clients


def content_type_for(photo: Path) -> str:
    return CONTENT_TYPE_BY_SUFFIX.get(photo.suffix.lower(), "application/x-image")


def predict_remote(url: str, photo_path: str | Path, timeout: float = 60.0) -> dict:
    """POST a photo to a running endpoint (its base URL or its /invocations URL)."""
    photo = Path(photo_path)
    try:
        body = photo.read_bytes()
    except OSError as exc:
        raise EndpointError(f"cannot read photo {photo}: {exc.strerror or exc}") from None
    endpoint = url.rstrip("/")
    if not endpoint.endswith("/invocations"):
        endpoint += "/invocations"
    try:
        response = httpx.post(endpoint, content=body, timeout=timeout,
                              headers={"Content-Type": content_type_for(photo), "Accept": JSON})
    except httpx.HTTPError as exc:
        raise EndpointError(f"cannot reach endpoint {endpoint}: {exc}") from None
    if response.status_code != 200:
        try:
            message = response.json().get("error", response.text)
        except ValueError:
            message = response.text
        raise EndpointError(f"{endpoint} answered {response.status_code} for {photo}: {message}")
    return response.json()


def predict_local(artifact: str | Path, photo_path: str | Path,
                  model: LoadedModel | None = None) -> dict:
    """The endpoint's answer for a photo without a server (pass `model` to reuse a load)."""
    model = model or load_model(artifact)
    photo = Path(photo_path)
    try:
        body = photo.read_bytes()
    except OSError as exc:
        raise EndpointError(f"cannot read photo {photo}: {exc.strerror or exc}") from None
    try:
        return json.loads(model.predict(body, content_type_for(photo)))
    except RequestError as exc:
        raise EndpointError(f"{photo}: {exc.message}") from None
