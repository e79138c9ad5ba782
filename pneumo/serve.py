"""The served endpoint: a FastAPI app around a Predictor that follows a registry alias.

    POST /predict         one image: multipart upload (any field name) or a raw body with an
                          image/* or application/octet-stream content type -> a prediction
    POST /predict/batch   several images in one multipart form -> a list of predictions
    GET  /health          liveness and the version being served
    GET  /model           name, version, threshold, labels, transform, card metrics

Every ``poll_seconds`` a background thread reads where the alias points; when it has moved,
the new version is loaded beside the old one and swapped in with one assignment, so a
request never sees a half-loaded model and none fails during the switch.
Every request is logged on the ``pneumo.serve`` logger (INFO), one line: method, path,
status, milliseconds and the model version that answered.
Uploads are bounded: bodies over ``max_bytes`` per image are refused with 413 before they
are read whole, images over ``max_pixels`` with 413 after a header read; a body that is not
an image is a 422, an unsupported content type a 415. Never a 500 for a bad upload.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from pneumo import registry as reg
from pneumo.predict import Prediction, Predictor

logger = logging.getLogger("pneumo.serve")

MAX_BATCH_FILES = 64
RAW_TYPES = ("image/", "application/octet-stream")


class UploadError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class ModelHolder:
    """The Predictor being served, replaced whole when the alias moves."""

    def __init__(self, registry: str, model_name: str, alias: str, *, max_pixels: Optional[int], predictor: Optional[Predictor] = None):
        self.registry, self.model_name, self.alias, self.max_pixels = registry, model_name, alias, max_pixels
        self.current = predictor or Predictor.from_registry(registry, model_name, alias=alias, max_pixels=max_pixels)
        self.last_error: Optional[str] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def refresh(self) -> bool:
        """Load and swap in the alias's version if it moved; True when it did."""
        version = reg.get_alias(self.registry, self.model_name, self.alias)
        if version is None or version == self.current.version:
            return False
        new = Predictor.from_registry(self.registry, self.model_name, version=version, max_pixels=self.max_pixels)
        old, self.current = self.current, new  # one reference: in-flight requests keep the old model
        logger.warning("%s %s: now serving %s (was %s)", self.model_name, self.alias, version, old.version)
        return True

    def start(self, poll_seconds: float) -> None:
        def loop() -> None:
            while not self._stop.wait(poll_seconds):
                try:
                    self.refresh()
                    self.last_error = None
                except Exception as error:  # keep serving the current model; say why on /health
                    self.last_error = f"{type(error).__name__}: {error}"
                    logger.warning("cannot follow %s %s: %s", self.model_name, self.alias, self.last_error)

        self._thread = threading.Thread(target=loop, name="pneumo-alias-poll", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise UploadError(413, f"upload of {int(declared)} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise UploadError(413, f"upload exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _files(request: Request, limit: int, max_files: int) -> list[tuple[str, bytes]]:
    """(name, bytes) of each uploaded image: every file of a multipart form, or the raw body."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        body = await _read_body(request, limit)

        async def replay() -> dict[str, Any]:  # the bounded body, for Starlette's form parser
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=max_files, max_fields=max_files)
        except Exception as error:  # malformed multipart, too many parts
            raise UploadError(422, f"cannot read the multipart form: {getattr(error, 'detail', error)}") from None
        files = []
        for key, value in form.multi_items():
            if hasattr(value, "read"):
                files.append((value.filename or key, await value.read()))
        await form.close()
        if not files:
            raise UploadError(422, "the form holds no file; upload the image as a file field (e.g. -F file=@xray.jpeg)")
        return files
    if content_type.startswith(RAW_TYPES):
        return [("body", await _read_body(request, limit))]
    raise UploadError(
        415,
        f"unsupported content type {content_type or '(none)'!r}: send multipart/form-data, "
        "or the raw image with an image/* or application/octet-stream content type",
    )


def _status(prediction: Prediction) -> int:
    """413 for an image over the pixel bound, 422 for anything else that could not be scored."""
    return 413 if (prediction.error or "").startswith("too large") else 422


def create_app(
    registry: str,
    model_name: str = "tinynet",
    alias: str = "champion",
    *,
    poll_seconds: float = 60.0,
    max_bytes: int = 20_000_000,
    max_pixels: int = 50_000_000,
    predictor: Optional[Predictor] = None,
) -> FastAPI:
    """The app; the alias is polled from startup to shutdown."""
    holder = ModelHolder(registry, model_name, alias, max_pixels=max_pixels, predictor=predictor)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        holder.start(poll_seconds)
        yield
        holder.stop()

    app = FastAPI(title="pneumo", summary="Pneumonia classifier for chest X-rays", lifespan=lifespan)
    app.state.holder = holder

    @app.middleware("http")
    async def log_request(request: Request, call_next):
        started = time.perf_counter()
        status = 500  # what the client gets when the handler raises
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            # The version that scored (set by the predict handlers), else the one being served.
            version = getattr(request.state, "version", None) or holder.current.version
            logger.info(
                "%s %s %d %.1f ms %s %s", request.method, request.url.path, status,
                1000 * (time.perf_counter() - started), model_name, version,
            )

    @app.exception_handler(UploadError)
    async def upload_error(request: Request, error: UploadError) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=error.status)

    @app.get("/health")
    def health() -> dict[str, Any]:
        current = holder.current
        return {"status": "ok", "model": model_name, "version": current.version, "alias": alias,
                "alias_error": holder.last_error}

    @app.get("/model")
    def model() -> dict[str, Any]:
        return {**holder.current.summary(), "alias": alias, "registry": registry, "poll_seconds": poll_seconds}

    @app.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        files = await _files(request, max_bytes, 2)  # 2: so that a second file gets the message below
        if len(files) != 1:
            raise UploadError(422, f"POST /predict takes one image, got {len(files)}; use /predict/batch")
        current = holder.current
        request.state.version = current.version
        (result,) = await run_in_threadpool(current.predict, files)
        if not result.ok:
            return JSONResponse({"detail": f"{result.input}: {result.error}", **result.to_dict()}, status_code=_status(result))
        return JSONResponse(result.to_dict())

    @app.post("/predict/batch")
    async def predict_batch(request: Request) -> JSONResponse:
        """Per-image results in upload order; an image that cannot be scored has its ``error``."""
        files = await _files(request, max_bytes * 5, MAX_BATCH_FILES)
        current = holder.current  # one model for the whole batch
        request.state.version = current.version
        scored = iter(await run_in_threadpool(current.predict, [f for f in files if len(f[1]) <= max_bytes]))
        results = [
            next(scored) if len(data) <= max_bytes
            else Prediction(name, None, None, current.threshold, current.model,
                            error=f"too large: {len(data)} bytes exceeds the limit of {max_bytes} bytes")
            for name, data in files
        ]
        return JSONResponse([r.to_dict() for r in results])

    return app
