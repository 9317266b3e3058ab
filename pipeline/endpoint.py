"""The local endpoint: the model artifact served over HTTP like a SageMaker real-time endpoint.

    GET  /ping          -> 200 {"status": "ok", "model_version": ...}
    POST /invocations   image/jpeg | image/png | application/x-image body
                        -> 200 {"count": n, "probabilities": {...}, "model_version": ...}

The artifact is loaded once, at start-up, through its own `code/inference.py` (model_fn,
input_fn, predict_fn, output_fn), the same functions the Evaluate step and the SageMaker
endpoint use. Bad input always gets a 4xx with a JSON body `{"error": "..."}`:
415 content type, 406 Accept, 413 size, 400 empty or undecodable body.
"""
from __future__ import annotations

import importlib.util
import json
import sys
import tarfile
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import ModuleType

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

JSON = "application/json"
MAX_BODY_BYTES = 10 * 1024 * 1024
DEFAULT_CONTENT_TYPES = ("image/jpeg", "image/png", "application/x-image")
CONTENT_TYPE_BY_SUFFIX = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}


class ArtifactError(Exception):
    """The model artifact cannot be found, extracted or loaded."""


class EndpointError(Exception):
    """A remote endpoint could not be reached or refused the request (message says why)."""


class RequestError(Exception):
    """A bad request: becomes `status` with a JSON `{"error": message}` body."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


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

    @property
    def invalid_input(self) -> type[Exception]:
        return getattr(self.inference, "InvalidInput", ValueError)

    def predict(self, body: bytes, content_type: str, accept: str = JSON) -> str:
        """Raw request body -> response text, exactly the endpoint's path. Raises RequestError."""
        try:
            image = self.inference.input_fn(body, content_type)
        except self.invalid_input as exc:
            raise RequestError(400, str(exc)) from None
        try:
            prediction = self.inference.predict_fn(image, self.model)
        except self.invalid_input as exc:
            raise RequestError(400, str(exc)) from None
        if isinstance(prediction, dict):
            prediction["model_version"] = self.model_version
        try:
            return self.inference.output_fn(prediction, accept)
        except self.invalid_input as exc:
            raise RequestError(406, str(exc)) from None


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
        workdir = tempfile.TemporaryDirectory(prefix="invmon-endpoint-")
        model_dir = Path(workdir.name)
        _safe_extract(tarball, model_dir)
    inference = _import_inference(model_dir / "code")
    try:
        model = inference.model_fn(str(model_dir))
    except Exception as exc:
        raise ArtifactError(f"{artifact}: model_fn could not load it "
                            f"({type(exc).__name__}: {exc})") from None
    if model_version is None:
        try:
            config = json.loads((model_dir / "model_config.json").read_text())
            model_version = config.get("model_id")
        except (OSError, ValueError, AttributeError):
            pass
    return LoadedModel(inference, model, str(model_version or "unknown"),
                       tuple(getattr(inference, "CONTENT_TYPES", DEFAULT_CONTENT_TYPES)), workdir)


# --------------------------------------------------------------------------- request checks


def _media_type(header: str | None) -> str:
    return (header or "").split(";")[0].strip().lower()


def negotiate(accept: str | None) -> str:
    """The answer's media type from the Accept header: JSON, or 406."""
    if not accept or not accept.strip():
        return JSON
    for item in accept.split(","):
        media, *params = [part.strip() for part in item.split(";")]
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if q > 0 and media.lower() in (JSON, "application/*", "*/*"):
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
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(413, f"body is over the limit of {limit} bytes")
    return bytes(body)


# --------------------------------------------------------------------------- the app


def create_app(artifact: str | Path, model_version: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The endpoint app. The model is loaded here, once, before the server accepts requests."""
    loaded = load_model(artifact, model_version)
    app = FastAPI(title="invmon bin-count endpoint", version=loaded.model_version)
    app.state.model = loaded

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

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
    async def ping() -> dict:
        return {"status": "ok", "model_version": loaded.model_version}

    @app.post("/invocations")
    async def invocations(request: Request) -> Response:
        content_type = request.headers.get("content-type")
        if not content_type:
            raise RequestError(415, "missing Content-Type header; "
                                    f"send one of {', '.join(loaded.content_types)}")
        if _media_type(content_type) not in loaded.content_types:
            raise RequestError(415, f"unsupported content type {content_type!r}; "
                                    f"send one of {', '.join(loaded.content_types)}")
        accept = negotiate(request.headers.get("accept"))
        body = await read_body(request, max_body_bytes)
        if not body:
            raise RequestError(400, "empty request body: send the bytes of a JPEG or PNG photo")
        # Decoding and the forward pass are CPU work: keep them off the event loop.
        text = await run_in_threadpool(loaded.predict, body, content_type, accept)
        return Response(text, media_type=accept)

    return app


def serve(artifact: str | Path, host: str = "127.0.0.1", port: int = 8080,
          model_version: str | None = None) -> None:
    """Serve the artifact until interrupted (Ctrl-C)."""
    import uvicorn

    app = create_app(artifact, model_version)
    print(f"serving model {app.state.model.model_version} on http://{host}:{port} "
          "(GET /ping, POST /invocations)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info")


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
