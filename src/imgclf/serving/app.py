"""The REST service: a FastAPI app serving one model bundle.

Routes: ``POST /v1/predict`` (multipart files, base64 JSON or one raw image), ``GET /v1/model``,
``GET /healthz``, the web page at ``/``, OpenAPI docs at ``/docs`` and ``/redoc`` (served offline), and
``POST /score`` for clients of the 2017 tutorial. Decoding runs in a thread pool, inference in one micro-batching worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from imgclf import __version__
from imgclf.bundle import Bundle
from imgclf.config import Config
from imgclf.features.extract import default_cache_dir
from imgclf.features.runtimes import Runtime, create_runtime, device_type, resolve_precision, resolve_runtime
from imgclf.serving.batching import MicroBatcher, NotRunning
from imgclf.serving.inputs import (
    ApiError,
    DecodingBudget,
    ImageInput,
    check_count,
    decode_image,
    images_from_request,
    images_from_tutorial_json,
    read_body,
)
from imgclf.serving.security import SECURITY_HEADERS, SecurityHeaders
from imgclf.utils import cpu_count

log = logging.getLogger(__name__)


class LabelScore(BaseModel):
    label: str
    score: float


class Prediction(BaseModel):
    label: str = Field(description="Most likely class.")
    score: float = Field(description="Its probability.")
    scores: dict[str, float] = Field(description="Probability of every class.")
    top_k: list[LabelScore] = Field(description="The top_k most likely classes, best first.")


class PredictResponse(BaseModel):
    predictions: list[Prediction] = Field(description="One per image, in request order.")
    model_id: str
    server_time_ms: float = Field(description="Time spent in the server, from request to response.")


class ErrorResponse(BaseModel):
    error: str = Field(description="Short error code, e.g. bad_image, body_too_large.")
    detail: str = Field(description="What is wrong with the request.")


_PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
                    },
                }
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "images": {"type": "array", "items": {"type": "string", "description": "base64 image"}},
                        "image": {"type": "string", "description": "one base64 image, instead of images"},
                    },
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (400, 401, 413, 415, 422, 503)}


def _net_key(bundle: Bundle, flip_tta: bool) -> str:
    """Content key of the classifier network (the bundle's model id, its preprocessing and the mirror
    averaging), naming its converted-model cache folder."""
    key = json.dumps([bundle.model_id, bundle.backbone_spec, flip_tta], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def build_runtime(bundle: Bundle, cfg: Config) -> Runtime:
    """The classifier (uint8 NHWC -> probabilities) on the serving runtime, with the mirror-image averaging
    of ``flip_tta`` inside; converted models are cached."""
    f = cfg.features
    dev = device_type(f.device)
    runtime = resolve_runtime(cfg.serve.serve_runtime, dev)
    model_dir = (f.cache_dir or default_cache_dir()) / "models" / f"serve-{runtime}-{_net_key(bundle, f.flip_tta)}"
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        log.warning("cannot cache the converted model in %s (%s); converting at every start", model_dir, e)
        model_dir = None
    return create_runtime(
        functools.partial(bundle.classifier_net, f.flip_tta),
        bundle.preprocess.resolution,
        runtime,
        resolve_precision(f.precision, runtime, dev, serving=True),
        f.device,
        f.workers or cpu_count(),
        model_dir,
    )


def _web_page() -> str | None:
    try:
        return resources.files("imgclf.serving").joinpath("static/index.html").read_text(encoding="utf-8")
    except (FileNotFoundError, ModuleNotFoundError):
        return None


class ModelService:
    """A loaded bundle, its runtime and the micro-batcher: image bytes -> predictions.

    :meth:`start` and :meth:`stop` bracket each run of the server (the app's lifespan), which may come
    more than once: every start gets fresh decoding and inference threads.
    """

    def __init__(self, bundle: Bundle, runtime: Runtime, cfg: Config) -> None:
        self.bundle, self.runtime, self.cfg = bundle, runtime, cfg
        self.top_k = min(cfg.serve.top_k, len(bundle.classes))
        self.batcher = MicroBatcher(runtime, cfg.serve.max_batch, cfg.serve.max_wait_ms)
        self.decoders: ThreadPoolExecutor | None = None
        # pixels decoded at once, across the decoding threads: one 100 Mpx PNG took 1.2 GB while it was decoded,
        # so as many at once as threads (the machine's cores) could exhaust the host's memory
        self.decoding = DecodingBudget(cfg.data.max_image_pixels)
        self.model_id = bundle.model_id
        self.started = time.time()

    async def start(self) -> None:
        """Start the decoding threads and the micro-batcher."""
        threads = self.cfg.features.workers or cpu_count()
        self.decoders = ThreadPoolExecutor(threads, thread_name_prefix="imgclf-decode")
        await self.batcher.start()

    async def stop(self) -> None:
        """Stop both; requests still waiting for them fail with :class:`NotRunning`."""
        await self.batcher.stop()
        if self.decoders is not None:
            self.decoders.shutdown(wait=False)
            self.decoders = None

    def warm_up(self) -> None:
        """Run every batch size once, so no request pays for a runtime's first-call set-up of a shape."""
        res = self.bundle.preprocess.resolution
        for n in range(1, self.cfg.serve.max_batch + 1):
            self.runtime(np.zeros((n, res, res, 3), np.uint8))

    async def predict(self, images: list[ImageInput]) -> list[Prediction]:
        check_count(len(images), self.cfg.serve.max_images_per_request)
        if self.decoders is None:
            raise NotRunning("the service is not running")
        loop = asyncio.get_running_loop()
        pre, max_pixels = self.bundle.preprocess, self.cfg.data.max_image_pixels
        with self.batcher.incoming():
            decoded = await asyncio.gather(
                *(
                    loop.run_in_executor(self.decoders, decode_image, im, pre, max_pixels, self.decoding)
                    for im in images
                ),
                return_exceptions=True,
            )
        failed = [d for d in decoded if isinstance(d, BaseException)]
        if other := next((e for e in failed if not isinstance(e, ApiError)), None):
            raise other
        if failed:  # all or nothing, but every unusable image named, so that the client can resend the good ones
            raise ApiError(422, "bad_image", "; ".join(map(str, failed)))
        arrays = [d for d in decoded if isinstance(d, np.ndarray)]
        return [self._prediction(p) for p in await self.batcher.infer(arrays)]

    def _prediction(self, probs: np.ndarray) -> Prediction:
        classes = self.bundle.classes
        order = np.argsort(-probs, kind="stable")
        best = int(order[0])
        top = [LabelScore(label=classes[i], score=float(probs[i])) for i in order[: self.top_k]]
        return Prediction(
            label=classes[best],
            score=float(probs[best]),
            scores={c: float(p) for c, p in zip(classes, probs, strict=True)},
            top_k=top,
        )

    def info(self) -> dict[str, Any]:
        b, pre = self.bundle, self.bundle.preprocess
        return {
            "model_id": self.model_id,
            "classes": b.classes,
            "backbone": b.backbone_spec["name"],
            "backbone_weights": b.backbone_spec["weights_id"],
            "resolution": pre.resolution,
            "crop_pct": pre.crop_pct,
            "interpolation": pre.interpolation,
            "classifier": b.classifier,
            "metrics": b.metrics,
            "created": b.created,
            "version": __version__,
            "runtime": self.runtime.name,
            "precision": self.runtime.precision,
        }


def _error(status: int, code: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status)


@contextlib.contextmanager
def _stopped_as_not_running() -> Iterator[None]:
    """A request cancelled by a forced stop (Ctrl-C twice) answered with the documented 503, not with
    uvicorn's plain-text 500 and a traceback in the log."""
    try:
        yield
    except asyncio.CancelledError:
        if (task := asyncio.current_task()) is not None:
            task.uncancel()  # this request is answered; the stop goes on
        raise ApiError(
            503,
            "not_running",
            "the server was stopped before answering this request; try again later",
            {"Connection": "close"},
        ) from None


API_KEY_VARIABLE = "IMGCLF_API_KEY"  # the key from the environment: a command line is seen by every local user


def serving_config(bundle: Bundle, cfg: Config | None = None) -> Config:
    """The settings a server of ``bundle`` runs with: those given in ``cfg`` (:meth:`Config.given`), over the
    training run's ``flip_tta`` and ``max_image_pixels`` (so that it scores and refuses as predict does: a
    tighter pixel limit chosen at training is kept where untrusted images arrive), over the defaults (device,
    threads and limits are the serving host's); the API key from ``$IMGCLF_API_KEY`` where none is given."""
    run: dict[str, Any] = {"flip_tta": bundle.flip_tta}
    if bundle.max_image_pixels is not None:
        run["max_image_pixels"] = bundle.max_image_pixels
    out = Config().updated(**{**run, **(cfg.given() if cfg else {})})
    if out.serve.api_key is None and (key := os.environ.get(API_KEY_VARIABLE)) is not None:
        if not key.strip():
            raise ValueError(
                f"${API_KEY_VARIABLE} is set but empty (an unset variable?): give it a key, e.g. "
                f"{API_KEY_VARIABLE}=$(openssl rand -hex 16), or unset it to serve without one"
            )
        out = out.updated(api_key=key)
    return out


def create_app(bundle: Bundle | str | Path, cfg: Config | None = None, flip_tta: bool | None = None) -> FastAPI:
    """The service for ``bundle`` (a Bundle, run folder or bundle folder), with the settings of
    :func:`serving_config` (``flip_tta``, where given, over them, as in predict); loads the model now."""
    bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    cfg = serving_config(bundle, cfg)
    cfg = cfg if flip_tta is None else cfg.updated(flip_tta=flip_tta)
    service = ModelService(bundle, build_runtime(bundle, cfg), cfg)
    service.warm_up()
    max_body = int(cfg.serve.max_upload_mb * 1e6)
    page = _web_page()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        except asyncio.CancelledError:  # a forced stop (Ctrl-C twice) stops the service too, without a traceback
            if (task := asyncio.current_task()) is not None:
                task.uncancel()
        finally:
            await service.stop()

    # no class names nor backbone here: /openapi.json needs no key, and /redoc renders HTML in its description
    about = "An image classifier: `GET /v1/model` gives its classes and backbone."
    app = FastAPIOffline(  # /docs and /redoc load their scripts from the package, not from a CDN
        title="imgclf", version=__version__, description=about, static_url="/docs-assets", lifespan=lifespan
    )
    app.add_middleware(SecurityHeaders)

    async def check_key(request: Request) -> None:
        key = cfg.serve.api_key
        given = request.headers.get("x-api-key")
        if key and (given is None or not secrets.compare_digest(given.encode(), key.encode())):
            raise ApiError(401, "unauthorized", "missing or wrong API key: send it in the X-API-Key header")

    auth = [Depends(check_key)]

    async def answer(images: list[ImageInput], t0: float) -> PredictResponse:
        """Scores of ``images`` with the model id and the time since ``t0`` (the request's arrival).

        Images not scored within ``request_timeout_s`` of receiving the body get 503 and leave the queue, so
        that a server behind on work does not spend it on answers nobody waits for; so do requests the
        server stops (or is stopped) before answering.
        """
        timeout = cfg.serve.request_timeout_s
        try:
            predictions = await asyncio.wait_for(service.predict(images), timeout)
        except TimeoutError:
            raise ApiError(
                503, "timeout", f"not answered within {timeout:g} s: the server is busy; try again later"
            ) from None
        except NotRunning as e:
            raise ApiError(503, "not_running", f"{e}: it is shutting down or restarting; try again later") from None
        return PredictResponse(
            predictions=predictions, model_id=service.model_id, server_time_ms=(time.perf_counter() - t0) * 1000
        )

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> JSONResponse:
        response = _error(e.status, e.code, e.detail)
        response.headers.update(e.headers)
        return response

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        response = _error(e.status_code, "http_error", str(e.detail))
        response.headers.update(e.headers or {})  # e.g. Allow of a 405
        return response

    @app.exception_handler(Exception)
    async def _server_error(_: Request, e: Exception) -> JSONResponse:
        response = _error(500, "internal_error", f"the server failed ({type(e).__name__}); see its log")
        response.headers.update(SECURITY_HEADERS)  # answered outside the middleware
        return response

    @app.post(
        "/v1/predict",
        response_model=PredictResponse,
        dependencies=auth,
        responses=_ERRORS,
        openapi_extra=_PREDICT_BODY,
        summary="Classify one or several images",
    )
    async def predict(request: Request) -> PredictResponse:
        t0 = time.perf_counter()
        with _stopped_as_not_running():
            body = await read_body(request, max_body, cfg.serve.request_timeout_s)
            return await answer(await images_from_request(request, body, cfg.serve.max_images_per_request), t0)

    @app.post(
        "/score",
        response_model=PredictResponse,
        dependencies=auth,
        responses=_ERRORS,
        summary='2017 tutorial clients: {"input_df": [{"image base64 string": "..."}]}',
    )
    async def score(request: Request) -> PredictResponse:
        t0 = time.perf_counter()
        with _stopped_as_not_running():
            body = await read_body(request, max_body, cfg.serve.request_timeout_s)
            images = await asyncio.to_thread(images_from_tutorial_json, body, cfg.serve.max_images_per_request)
            return await answer(images, t0)

    @app.get("/v1/model", dependencies=auth, responses=_ERRORS, summary="The served model")
    async def model() -> dict[str, Any]:
        return service.info()

    @app.get("/healthz", summary="Liveness, with micro-batching counters")
    async def healthz() -> dict[str, Any]:
        s = service.batcher.stats
        uptime = round(time.time() - service.started, 1)
        return {
            "status": "ok",
            "model_id": service.model_id,
            "uptime_s": uptime,
            "batches": s.batches,
            "images": s.images,
            "largest_batch": s.largest,
        }

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        if page is None:
            raise ApiError(404, "no_web_page", "imgclf/serving/static/index.html is not installed")
        return HTMLResponse(page)

    return app
