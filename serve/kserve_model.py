"""``streamtrain serve --server kserve``: the same versions, loading and decoding, on KServe's own model server (the kserve extra).

:class:`StreamtrainModel` is a ``kserve.Model`` that answers from the watcher's current
version (``serve/watcher.py``: the repository, validation, hot reload and roll-back stay
ours), with the decoders of the FastAPI app: v1 bodies through
:func:`streamtrain.serve.model.parse_instances`, v2 tensors through
:func:`streamtrain.serve.v2.rows` and :func:`streamtrain.serve.v2.answer` (kserve has cut
the binary tensor data from the body, or taken it from gRPC's ``raw_input_contents``).
``kserve.ModelServer`` supplies the routes: v1 and v2 REST, gRPC v2, ``/metrics`` (its
own histograms and, on the same registry, ours). What it does not have: versions in the
v2 paths (501), a body-size limit, our ``/healthz``/``/readyz`` and a bind address (it
listens on 0.0.0.0); a bad request is kserve's 400 ``{"error": ...}`` with our message.

Imported only for ``--server kserve``: kserve pulls ~30 packages (kubernetes, pandas,
grpcio-tools) that the FastAPI server does not need.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from typing import Any

import numpy as np
from prometheus_client import REGISTRY

from streamtrain.serve import v2
from streamtrain.serve.metrics import ServeMetrics
from streamtrain.serve.model import InputError, parse_instances
from streamtrain.serve.watcher import ModelWatcher

_argv, sys.argv = sys.argv, sys.argv[:1]  # kserve.model_server parses sys.argv when it is imported: not ours to parse
try:
    import kserve
    from kserve import model_server
    from kserve.errors import InvalidInput, ModelNotReady
    from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse, get_content
finally:
    sys.argv = _argv

__all__ = ["StreamtrainModel", "metrics_on_kserves_registry", "serve"]

log = logging.getLogger("streamtrain.serve")


class StreamtrainModel(kserve.Model):
    """The watcher's current version behind kserve's routes; ready while a version is loaded."""

    def __init__(self, watcher: ModelWatcher, metrics: ServeMetrics, max_instances: int = 4096) -> None:
        super().__init__(watcher.name)
        self.watcher = watcher
        self.metrics = metrics
        self.max_instances = max_instances

    @property
    def ready(self) -> bool:  # kserve's readiness routes and its check before every request read this
        return self.watcher.current is not None

    @ready.setter
    def ready(self, _value: bool) -> None:
        pass  # kserve sets it on load/start/stop; readiness is the watcher's: a version loaded or not

    def load(self) -> bool:
        return self.watcher.check() is not None

    def get_input_types(self) -> list[dict]:
        m = self.watcher.current
        return [] if m is None else [{"name": n, "datatype": d, "shape": s} for n, d, s in v2.inputs_of(m)]

    def get_output_types(self) -> list[dict]:
        m = self.watcher.current
        return [] if m is None else [{"name": n, "datatype": d, "shape": s} for n, d, s in v2.outputs_of(m)]

    def predict(self, payload: Any, headers: dict | None = None, response_headers: dict | None = None) -> Any:
        """v1 ``{"instances": [...]}`` (a dict) or a v2 :class:`InferRequest` (REST or gRPC); on the event loop, as kserve calls it."""
        m = self.watcher.current  # this request's model, whatever swaps meanwhile
        if m is None:
            raise ModelNotReady(self.name)
        try:
            if isinstance(payload, InferRequest):
                return self._infer(m, payload)
            if isinstance(payload, bytes):  # kserve passes a body without a JSON content type as it came
                payload = _json(payload)
            x, ids = parse_instances(payload, m, self.max_instances)
            predictions = m.predict(x, ids, probabilities=payload.get("probabilities") is True)
            if not _finite(predictions):  # orjson would write NaN as null
                raise InputError(f"instances: the model's output is not a finite number for these inputs (version {m.version})")
        except InputError as exc:
            raise InvalidInput(str(exc)) from exc
        self.metrics.instances.inc(len(x))
        return {"predictions": predictions, "model_version": str(m.version)}

    def _infer(self, m: Any, request: InferRequest) -> InferResponse:
        by_name = {}
        for i, t in enumerate(request.inputs):
            raw = t._raw_data  # the tensor's binary data, cut from the body by kserve; no public reader gives the bytes
            data = t.data
            if raw is None and not isinstance(data, list):
                data = get_content(t.datatype, data)  # gRPC's typed contents
            doc = {"name": t.name, "datatype": t.datatype, "shape": [int(d) for d in t.shape], "data": data}
            by_name[t.name] = (doc, f"inputs[{i}] ({t.name})", None if raw is None else memoryview(raw))
        x, ids = v2.rows(by_name, m, self.max_instances)
        answers = v2.answer(m, x, ids)
        outputs = []
        for name, datatype, _shape in v2.outputs_of(m):
            value = np.asarray(answers[name], dtype=object) if datatype == "BYTES" else answers[name]
            out = InferOutput(name, list(value.shape), datatype, data=None if request.from_grpc else value)
            if request.from_grpc:  # kserve 0.21's to_grpc() tests an array's truth when the inputs came raw: give it bytes
                out.set_data_from_numpy(value, binary_data=True)
            outputs.append(out)
        self.metrics.instances.inc(len(x))
        return InferResponse(
            request.id or "",  # kserve's response model needs a string; the protocol's id is optional
            self.name,
            outputs,
            model_version=str(m.version),
            from_grpc=request.from_grpc,
            use_binary_outputs=request.use_binary_outputs,
            requested_outputs=request.request_outputs,
        )


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"body: not valid JSON ({exc})") from exc
    except RecursionError as exc:
        raise InputError("body: JSON nested too deeply") from exc


def _finite(v: Any) -> bool:
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, list):
        return all(_finite(e) for e in v)
    if isinstance(v, dict):
        return all(_finite(e) for e in v.values())
    return True


def metrics_on_kserves_registry() -> ServeMetrics:
    """Our metrics on prometheus_client's default registry, the one kserve's ``/metrics`` renders."""
    return ServeMetrics(REGISTRY)


def serve(watcher: ModelWatcher, metrics: ServeMetrics, port: int, grpc_port: int | None, max_instances: int = 4096) -> None:
    """Run kserve's ModelServer (REST on ``port``, gRPC v2 on ``grpc_port`` unless None) until SIGTERM/SIGINT."""
    from streamtrain.serve.app import Measured

    model = StreamtrainModel(watcher, metrics, max_instances)
    server = kserve.ModelServer(
        http_port=port,
        grpc_port=grpc_port or 0,
        enable_grpc=grpc_port is not None,
        workers=1,
        enable_latency_logging=False,
    )
    for name in ("kserve", "kserve.trace", "uvicorn.access"):  # a log line per request otherwise (gRPC's method, timings)
        logging.getLogger(name).setLevel(logging.WARNING)
    model_server.app.add_middleware(Measured, metrics=metrics)  # our request counters and latency, by handler
    server.register_model(model)  # registered even before a version is there: not ready (503) until one is
    server.start([])  # start(models) refuses to start without a ready model
