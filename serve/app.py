"""The HTTP side of ``streamtrain serve``: KServe / TF Serving v1 routes, and the v2 protocol's (``serve/v2.py``), on FastAPI.

- ``POST /v1/models/{name}:predict`` with ``{"instances": [...]}`` -> ``{"predictions": [...], "model_version": "..."}``
- ``GET /v1/models/{name}``: the version served (TF Serving's ``model_version_status``, and more)
- ``/v2/...``: the Open Inference Protocol, as Triton's and KServe's clients speak it
- ``/healthz`` (the process and its watcher live), ``/readyz`` (a version is loaded), ``/metrics``

A request takes the watcher's current model once (one reference, no lock) and answers
with it; bad input is a 422 whose ``error`` names the field, a body over the limit a
413, and nothing a client sends gives a 500.  JSON parsing, checks and the forward pass
of a small body (up to ``inline_bytes``, 64 KiB: an MLP's batch of 64 is 25 KiB) run on
the event loop: the hop to a worker thread cost a third of the throughput at batch 1 on
two cores (docs/BENCHMARKS.md, Serving).  Larger bodies go to a worker thread, so a big
batch does not stall the loop for the requests behind it.
"""

from __future__ import annotations

import json
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from streamtrain.serve import v2
from streamtrain.serve.metrics import ServeMetrics
from streamtrain.serve.model import InputError, ServedModel, parse_instances
from streamtrain.serve.watcher import ModelWatcher

__all__ = ["Measured", "create_app"]

VERSION = "0.1.0"


def create_app(
    watcher: ModelWatcher, metrics: ServeMetrics, max_body_bytes: int = 4 << 20, max_instances: int = 4096, inline_bytes: int = 64 << 10
) -> Any:
    """The ASGI application: the FastAPI routes inside the request-metrics wrapper."""
    name = watcher.name
    app = FastAPI(title="streamtrain serve", version=VERSION, description=f"Serves model {name!r} from {watcher.root}.")

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> Response:
        return _json(exc.status_code, {"error": str(exc.detail)})

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _json(422, {"error": f"{where}: {first.get('msg', 'invalid')}"})

    def unknown(model: str) -> Response:
        return _json(404, {"error": f"no model {model!r} here; this server serves {name!r}"})

    def not_loaded() -> Response:
        why = f" (last problem: {watcher.last_error})" if watcher.last_error else ""
        return _json(503, {"error": f"no valid version of {name!r} in {watcher.root} yet{why}"})

    @app.post(
        "/v1/models/{model}:predict",
        summary="Predict",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["instances"],
                            "properties": {"instances": {"type": "array", "items": {"oneOf": [{"type": "object"}, {"type": "array"}]}}},
                        },
                        "example": {"instances": [{"f0": 0.5, "f1": -1.2}, [0.5, -1.2]]},
                    }
                },
            }
        },
    )
    async def predict(model: str, request: Request) -> Response:
        """``{"instances": [{"feature": value, ...} | [values in feature order], ...]}``; answers one prediction per instance."""
        m = watcher.current  # this request's model, whatever swaps meanwhile
        if model != name:
            return unknown(model)
        if m is None:
            return not_loaded()
        raw = await read_body(request, max_body_bytes)
        if isinstance(raw, Response):
            return raw
        try:
            if len(raw) <= inline_bytes:
                body = _predict(m, raw, max_instances)
            else:
                body = await run_in_threadpool(_predict, m, raw, max_instances)
        except InputError as exc:
            return _json(422, {"error": str(exc)})
        metrics.instances.inc(body[1])
        return Response(body[0], media_type="application/json")

    @app.get("/v1/models/{model}", summary="Model status")
    async def status(model: str) -> Response:
        m = watcher.current
        if model != name:
            return unknown(model)
        if m is None:
            return not_loaded()
        prev = watcher.previous
        return _json(
            200,
            {
                "model_version_status": [
                    {"version": str(m.version), "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
                ],
                "streamtrain": {
                    **m.status(),
                    "repository": str(watcher.root / name),
                    "previous_version": None if prev is None else str(prev.version),
                    "refused": [{"version": str(v), "reason": why} for v, (_files, why) in sorted(watcher.refused.items())],
                },
            },
        )

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> Response:
        ok = watcher.alive()
        return _json(200 if ok else 503, {"status": "ok" if ok else "fail", "checks": {"watcher": "ok" if ok else "stopped"}})

    @app.get("/readyz", summary="Readiness: a version is loaded")
    async def readyz() -> Response:
        m = watcher.current
        if m is None:
            return _json(503, {"status": "fail", "checks": {"model": f"no valid version of {name!r} in {watcher.root} yet"}})
        return _json(200, {"status": "ok", "checks": {"model": f"version {m.version}"}})

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    v2.add_routes(app, watcher, metrics, VERSION, max_body_bytes, max_instances, inline_bytes)
    return Measured(app, metrics)


async def read_body(request: Request, max_body_bytes: int) -> bytes | Response:
    """The request's body, or a 413 once it is over the limit (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
        return _too_large(max_body_bytes)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body_bytes:
            return _too_large(max_body_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


def _predict(m: ServedModel, raw: bytes, max_instances: int) -> tuple[bytes, int]:
    """Worker thread: parse, check, predict, encode; :class:`InputError` for anything the client got wrong."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"body: not valid JSON ({exc})") from exc
    except RecursionError as exc:  # found by trying: deep brackets answered 500 with a traceback
        raise InputError("body: JSON nested too deeply") from exc
    x, ids = parse_instances(doc, m, max_instances)
    predictions = m.predict(x, ids, probabilities=bool(isinstance(doc, dict) and doc.get("probabilities") is True))
    try:
        out = json.dumps({"predictions": predictions, "model_version": str(m.version)}, allow_nan=False)
    except ValueError as exc:  # inputs far outside anything trained on can overflow the model
        raise InputError(f"instances: the model's output is not a finite number for these inputs (version {m.version})") from exc
    return out.encode(), len(x)


def _json(code: int, doc: dict) -> Response:
    return Response(json.dumps(doc).encode(), status_code=code, media_type="application/json")


def _too_large(limit: int) -> Response:
    return _json(413, {"error": f"body: larger than {limit} bytes (streamtrain serve --max-body-bytes)"})


class Measured:
    """Counts every response by handler and code and times it; outermost, so it sees even a framework's 500."""

    def __init__(self, app: FastAPI, metrics: ServeMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        code = [500]

        async def measured_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                code[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, measured_send)
        finally:
            handler = _handler(scope.get("path", ""))
            self.metrics.requests.labels(handler, str(code[0])).inc()
            self.metrics.latency.labels(handler).observe(time.perf_counter() - started)


def _handler(path: str) -> str:
    if path.startswith("/v1/models/"):
        return "predict" if path.endswith(":predict") else "status"
    if path.startswith("/v2"):
        return "v2_infer" if path.endswith("/infer") else "v2_health" if path.startswith("/v2/health/") else "v2_metadata"
    return {"/healthz": "healthz", "/readyz": "readyz", "/metrics": "metrics"}.get(path, "other")
