"""The served endpoint: a FastAPI app around a Predictor that follows a registry alias.

    POST /predict         one image: multipart upload (any field name) or a raw body with an
                          image/* or application/octet-stream content type -> a prediction
    POST /predict/batch   several images in one multipart form -> a list of predictions
    GET  /health          liveness, the version being served, and "degraded" with the problem
                          when the alias cannot be followed (?strict=true: 503 then)
    GET  /model           name, version, threshold, labels, transform, card metrics

Every ``poll_seconds`` a background thread reads where the alias points; when it has moved,
the new version is loaded beside the old one and swapped in with one assignment, so a
request never sees a half-loaded model and none fails during the switch.
Every request is logged on the ``pneumo.serve`` logger (INFO), one line: method, path,
status, milliseconds and the model version that answered.
Uploads are bounded: bodies over ``max_bytes`` per image are refused with 413 before they
are read whole, images over ``max_pixels`` with 413 after a header read; a body that is not
an image is a 422, an unsupported content type a 415. Never a 500 for a bad upload.
A body is parsed as it arrives and each image in it spooled to disk past ``SPOOL_BYTES``;
the images of a request are read back one at a time, so memory holds one of them at most.
Decoding is bounded across requests: each image holds its decode cost (``images.decode_cost``,
from its header, plus its bytes) of a shared ``decode_memory`` budget while it is scored,
waits while the budget is spent, and gives the memory back to the system afterwards; an
image costing more than the whole budget is a 413. The default budget follows the tightest
of RAM, the cgroup's limit and the address-space limit (``pneumo.memory``); a MemoryError
all the same is a 503 with Retry-After, as is a request cancelled by the server's shutdown.
A body that does not arrive within ``body_seconds`` is a 408 and its connection is closed;
media types are matched case-insensitively, and a multipart body cut short says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import threading
import time
from pathlib import Path
from tempfile import SpooledTemporaryFile
from typing import Any, AsyncIterator, Optional

from fastapi import APIRouter, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from pneumo import memory
from pneumo import registry as reg
from pneumo import storage
from pneumo.images import decode_cost
from pneumo.names import printable
from pneumo.predict import Prediction, Predictor

logger = logging.getLogger("pneumo.serve")


def log_requests_to_stderr() -> None:
    """One timestamped line per request (the middleware's) on stderr, apart from the root logger."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False

MAX_BATCH_FILES = 64
RAW_TYPES = ("image/", "application/octet-stream", "application/dicom")


DECODE_WAIT_SECONDS = 60.0  # longest wait for decode memory before a 503
TRIM_BYTES = 64 * 2**20  # after a decode this large, hand freed memory back to the system
SPOOL_BYTES = 2**20  # an upload past this size waits on disk, not in memory (Starlette's own part size)
ANSWER_SECONDS = 0.5  # at shutdown, the longest wait for cancelled requests to answer 503
RETRY_AFTER_SECONDS = 5  # what a 503 asks the client to wait: about one large decode


def default_decode_memory(limits: Optional[memory.MemoryLimits] = None) -> int:
    """A quarter of the RAM this process may use (physical, or its cgroup's limit), between 256 MB
    and 2 GB, and never more than half of that RAM nor half of the address space left under an
    address-space limit (``ulimit -v``): the rest is for the model, the threads and the uploads."""
    limits = limits or memory.memory_limits()
    ram = min(limits.ram, limits.cgroup or limits.ram)
    budget = min(max(ram // 4, 256 * 2**20), 2 * 2**30, ram // 2)
    if limits.address_space is not None:
        budget = min(budget, limits.address_space // 2)
    return max(budget, 1)


def _libc() -> Optional[ctypes.CDLL]:
    name = ctypes.util.find_library("c")  # runs ldconfig: once, at import, not under memory pressure
    return ctypes.CDLL(name) if name else None


LIBC = _libc()


def _trim() -> None:
    """Give freed heap pages back to the system (glibc keeps them otherwise: RSS stays at its peak)."""
    if LIBC is not None and hasattr(LIBC, "malloc_trim"):
        LIBC.malloc_trim(0)


class DecodeBudget:
    """Bytes of decoding in flight across all requests: a counting semaphore over bytes."""

    def __init__(self, total: int, wait_seconds: float = DECODE_WAIT_SECONDS):
        self.total, self.wait_seconds, self.used = total, wait_seconds, 0
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def hold(self, cost: int):
        with self._changed:
            if not self._changed.wait_for(lambda: self.used + cost <= self.total, timeout=self.wait_seconds):
                raise UploadError(503, f"busy: no decode memory free for {self.wait_seconds:g} s; retry later")
            self.used += cost
        try:
            yield
        finally:
            with self._changed:
                self.used -= cost
                self._changed.notify_all()
            if cost >= TRIM_BYTES:
                _trim()


class AliasUnavailable(RuntimeError):
    """Nothing to follow: the registry is unreachable or the alias is missing (the message says which)."""


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
        """Load and swap in the alias's version if it moved; True when it did.

        Raises AliasUnavailable saying "registry unreachable" or "alias missing" when there is
        nothing to follow: the caller keeps serving the current model and reports it.
        """
        if not storage.is_s3(self.registry) and not Path(self.registry).is_dir():
            raise AliasUnavailable(f"registry unreachable: {self.registry} is not a folder (moved, deleted or unmounted)")
        version = reg.get_alias(self.registry, self.model_name, self.alias)
        if version is None:
            raise AliasUnavailable(f"alias missing: {self.model_name} has no alias {self.alias!r} in {self.registry}")
        if version == self.current.version:
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
                    self.last_error = str(error) if isinstance(error, AliasUnavailable) else f"{type(error).__name__}: {error}"
                    logger.warning("cannot follow %s %s: %s", self.model_name, self.alias, self.last_error)

        self._thread = threading.Thread(target=loop, name="pneumo-alias-poll", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()


class _Body:
    """The request body as it arrives: refused with 413 as soon as it is known to exceed ``limit``
    bytes, and watched for the line that closes a multipart body. Nothing is kept but a counter
    and the last bytes: the caller writes each chunk where it belongs (a spooled file)."""

    def __init__(self, request: Request, limit: int, closing: bytes = b""):
        self.request, self.limit, self.closing = request, limit, closing
        self.size, self.complete, self._tail = 0, not closing, b""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise UploadError(413, f"upload of {int(declared)} bytes exceeds the limit of {limit} bytes")

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body in pieces of about SPOOL_BYTES: a thread hop per piece written to a spooled
        file costs more than the copy into one (parsing 64 KB pieces took 4 times as long)."""
        pending = bytearray()
        async for chunk in self.request.stream():
            self.size += len(chunk)
            if self.size > self.limit:
                raise UploadError(413, f"upload exceeds the limit of {self.limit} bytes")
            pending += chunk
            if len(pending) >= SPOOL_BYTES:
                yield self._seen(bytes(pending))
                pending.clear()
        if pending:
            yield self._seen(bytes(pending))

    def _seen(self, piece: bytes) -> bytes:
        if not self.complete:  # the closing line may straddle two pieces
            keep = len(self.closing) - 1
            self.complete = self.closing in self._tail + piece[: keep + 1] or self.closing in piece
            self._tail = (self._tail + piece[-keep:])[-keep:]
        return piece

    def too_slow(self, seconds: float) -> UploadError:
        return UploadError(408, f"the request body did not arrive within {seconds:g} s ({self.size} bytes received)")


def _spooled(name: str) -> UploadFile:
    """An empty upload held in memory up to SPOOL_BYTES, on disk past it."""
    return UploadFile(SpooledTemporaryFile(max_size=SPOOL_BYTES), size=0, filename=name)  # type: ignore[arg-type]


def _media_type(request: Request) -> str:
    """The content type without its parameters, lower-case: media types are case-insensitive (RFC 9110)."""
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _closing_boundary(request: Request) -> bytes:
    """``--BOUNDARY--``, the line that ends a complete multipart body."""
    for parameter in request.headers.get("content-type", "").split(";")[1:]:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "boundary":
            return b"--" + value.strip().strip('"').encode("latin-1") + b"--"
    raise UploadError(422, "multipart/form-data without a boundary parameter")


async def _form_files(request: Request, limit: int, max_files: int, seconds: float) -> list[tuple[str, UploadFile]]:
    """The file parts of a multipart body, parsed as it arrives; each part spooled to disk past
    SPOOL_BYTES by Starlette's parser (the body itself is never held whole)."""
    body = _Body(request, limit, _closing_boundary(request))
    parser = MultiPartParser(request.headers, body.chunks(), max_files=max_files, max_fields=max_files)
    try:
        async with asyncio.timeout(seconds):  # the parser closes its files on any error
            form = await parser.parse()
    except TimeoutError:
        raise body.too_slow(seconds) from None
    except MultiPartException as error:  # malformed multipart, too many parts
        raise UploadError(422, f"cannot read the multipart form: {error.message}") from None
    files = [(value.filename or key, value) for key, value in form.multi_items() if isinstance(value, UploadFile)]
    if not body.complete:
        await form.close()
        raise UploadError(
            422, f"the multipart body is incomplete: {body.size} bytes without the closing boundary "
            f"{body.closing.decode('latin-1')!r} (the upload was cut short)",
        )
    if not files:
        raise UploadError(422, "the form holds no file; upload the image as a file field (e.g. -F file=@xray.jpeg)")
    return files


async def _raw_file(request: Request, limit: int, seconds: float) -> UploadFile:
    """The raw body, spooled to disk past SPOOL_BYTES as it arrives."""
    body, upload = _Body(request, limit), _spooled("body")
    try:
        async with asyncio.timeout(seconds):
            async for chunk in body.chunks():
                await upload.write(chunk)
    except TimeoutError:
        upload.file.close()
        raise body.too_slow(seconds) from None
    except BaseException:
        upload.file.close()
        raise
    return upload


@contextlib.asynccontextmanager
async def _uploads(request: Request, limit: int, max_files: int, seconds: float) -> AsyncIterator[list[tuple[str, UploadFile]]]:
    """(name, spooled file) of each uploaded image: every file of a multipart form, or the raw
    body; a body that has not arrived whole within ``seconds`` is a 408 (a client that declares
    a body and never sends it must not hold a connection and a worker forever). The files are
    closed (and removed from disk) on exit."""
    content_type = request.headers.get("content-type", "")
    media_type = _media_type(request)
    if media_type == "multipart/form-data":
        files = await _form_files(request, limit, max_files, seconds)
    elif media_type.startswith(RAW_TYPES):
        files = [("body", await _raw_file(request, limit, seconds))]
    else:
        raise UploadError(
            415,
            f"unsupported content type {content_type or '(none)'!r}: send multipart/form-data, "
            "or the raw image with an image/* or application/octet-stream content type",
        )
    try:
        yield files
    finally:
        for _, upload in files:
            await upload.close()


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
    body_seconds: float = 30.0,
    decode_memory: Optional[int] = None,
    predictor: Optional[Predictor] = None,
) -> FastAPI:
    """The app; the alias is polled from startup to shutdown. ``decode_memory`` in bytes
    (default: ``default_decode_memory()``)."""
    holder = ModelHolder(registry, model_name, alias, max_pixels=max_pixels, predictor=predictor)
    budget = DecodeBudget(decode_memory or default_decode_memory())

    in_flight: set[asyncio.Task] = set()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        holder.start(poll_seconds)
        yield
        holder.stop()
        # Uvicorn has cancelled the requests still running: give them a moment to send their 503.
        deadline = time.monotonic() + ANSWER_SECONDS
        while in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    app = FastAPI(title="pneumo", summary="Pneumonia classifier for chest X-rays", lifespan=lifespan)
    app.state.holder = holder
    app.middleware("http")(_request_log(holder))
    app.add_middleware(ShutdownAnswer, in_flight=in_flight)  # added last: outside the request log
    app.add_exception_handler(UploadError, _upload_error)
    app.add_exception_handler(MemoryError, _out_of_memory)
    app.include_router(_model_routes(holder, poll_seconds))
    app.include_router(_predict_routes(holder, budget, max_bytes, body_seconds))
    return app


def _request_log(holder: ModelHolder):
    """The middleware that logs every request in one line, with the model version that answered."""

    async def log_request(request: Request, call_next):
        started = time.perf_counter()
        status = 500  # what the client gets when the handler raises
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        except asyncio.CancelledError:  # shutdown cancelled it: ShutdownAnswer tells the client 503
            status = 503
            raise
        finally:
            # The version that scored (set by the predict handlers), else the one being served.
            version = getattr(request.state, "version", None) or holder.current.version
            logger.info(
                "%s %s %d %.1f ms %s %s", request.method, printable(request.url.path), status,  # no terminal escapes from a client
                1000 * (time.perf_counter() - started), holder.model_name, version,
            )

    return log_request


class ShutdownAnswer:
    """A request still running when shutdown cancels it (SIGTERM, after the grace period) is
    answered 503 with Retry-After and its connection closed, not uvicorn's 500."""

    def __init__(self, app, in_flight: set):
        self.app, self.in_flight = app, in_flight

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, task = False, asyncio.current_task()

        async def watched(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        self.in_flight.add(task)
        try:
            await self.app(scope, receive, watched)
        except asyncio.CancelledError:
            if started:
                raise
            task.uncancel()  # the request ends here, answered
            answer = JSONResponse({"detail": "the server is shutting down; retry later"}, status_code=503,
                                  headers={"retry-after": str(RETRY_AFTER_SECONDS), "connection": "close"})
            await answer(scope, receive, send)
        finally:
            self.in_flight.discard(task)


async def _upload_error(request: Request, error: UploadError) -> JSONResponse:
    # After a 408 the rest of the body may still be on its way: close the connection.
    headers = {"connection": "close"} if error.status == 408 else None
    if error.status == 503:
        headers = {"retry-after": str(RETRY_AFTER_SECONDS)}
    return JSONResponse({"detail": str(error)}, status_code=error.status, headers=headers)


async def _out_of_memory(request: Request, error: MemoryError) -> JSONResponse:
    """An allocation failed under the process's memory limit (RAM, cgroup or ``ulimit -v``) while
    others were decoding: a 503 the client may retry, not a 500."""
    _trim()
    logger.warning("out of memory while answering a request (%s); answered 503", str(error) or type(error).__name__)
    return JSONResponse({"detail": "busy: out of memory while handling the request; retry later"},
                        status_code=503, headers={"retry-after": str(RETRY_AFTER_SECONDS)})


def _model_routes(holder: ModelHolder, poll_seconds: float) -> APIRouter:
    """GET /health and GET /model."""
    router = APIRouter()

    @router.get("/health")
    def health(strict: bool = False) -> JSONResponse:
        """200 while a model is served; "degraded" (and 503 with ?strict=true) while the alias cannot be followed."""
        current, problem = holder.current, holder.last_error
        body = {"status": "degraded" if problem else "ok", "problem": problem, "model": holder.model_name,
                "version": current.version, "alias": holder.alias, "alias_error": problem}
        return JSONResponse(body, status_code=503 if problem and strict else 200)

    @router.get("/model")
    def model() -> dict[str, Any]:
        return {**holder.current.summary(), "alias": holder.alias, "registry": holder.registry, "poll_seconds": poll_seconds}

    return router


def _predict_routes(holder: ModelHolder, budget: DecodeBudget, max_bytes: int, body_seconds: float) -> APIRouter:
    """POST /predict and POST /predict/batch."""
    router = APIRouter()

    @router.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        # 2: so that a second file gets the message below
        async with _uploads(request, max_bytes, 2, body_seconds) as files:
            if len(files) != 1:
                raise UploadError(422, f"POST /predict takes one image, got {len(files)}; use /predict/batch")
            current = holder.current
            request.state.version = current.version
            (result,) = await run_in_threadpool(_score, current, files, budget)
        if not result.ok:
            return JSONResponse({"detail": f"{result.input}: {result.error}", **result.to_dict()}, status_code=_status(result))
        return JSONResponse(result.to_dict())

    @router.post("/predict/batch")
    async def predict_batch(request: Request) -> JSONResponse:
        """Per-image results in upload order; an image that cannot be scored has its ``error``."""
        async with _uploads(request, max_bytes * 5, MAX_BATCH_FILES, body_seconds) as files:
            current = holder.current  # one model for the whole batch
            request.state.version = current.version
            scored = iter(await run_in_threadpool(_score, current, [f for f in files if f[1].size <= max_bytes], budget))
            results = [
                next(scored) if upload.size <= max_bytes
                else Prediction(name, None, None, current.threshold, current.model,
                                error=f"too large: {upload.size} bytes exceeds the limit of {max_bytes} bytes")
                for name, upload in files
            ]
        return JSONResponse([r.to_dict() for r in results])

    return router


def _score(current: Predictor, files: list[tuple[str, UploadFile]], budget: DecodeBudget) -> list[Prediction]:
    """One image at a time, read from its spooled file, each within the decode budget (runs in
    the thread pool): a batch holds one part in memory at a time, counted with its decode."""
    results = []
    for name, upload in files:
        upload.file.seek(0)
        data = upload.file.read()
        cost = decode_cost(data) + len(data)
        if cost > budget.total:
            results.append(Prediction(name, None, None, current.threshold, current.model, error=(
                f"too large to decode: needs about {cost // 2**20} MB, over the server's decode "
                f"memory of {budget.total // 2**20} MB")))
            continue
        with budget.hold(cost):
            results += current.predict([(name, data)])
        del data
    return results
