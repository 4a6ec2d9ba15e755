"""The Open Inference Protocol (v2) routes of ``streamtrain serve``: what Triton's and KServe's v2 clients speak.

- ``GET /v2/health/live``, ``GET /v2/health/ready``, ``GET /v2`` (the server's metadata)
- ``GET /v2/models/{name}[/versions/{v}]`` (the model's metadata: its input and output tensors), ``.../ready``
- ``POST /v2/models/{name}[/versions/{v}]/infer``

The tensors (:func:`metadata` lists them for the version loaded):

- input ``features``, ``FP32`` (or any numeric datatype) of shape ``[n, width]``: the raw
  numbers in the model's feature order, ``NaN`` (``null`` in JSON) where one is missing
  for a model trained to impute it; a model with categorical fields also takes input
  ``categorical``, ``BYTES`` ``[n, fields]``: each field's value as text, in the model's
  field order (an integer category as its digits, a boolean as ``true``/``false``: the
  bytes training hashed), ``null`` in JSON for a missing one;
- outputs: regression ``prediction`` ``FP32 [n]`` (in the label's units); binary
  ``probability`` ``FP32 [n]`` (of the positive class) and ``class`` ``INT64 [n]``;
  multiclass ``probabilities`` ``FP32 [n, classes]`` and ``class`` ``INT64 [n]``; with
  class names (``trainer.classes``) ``class`` is ``BYTES``.  A request's ``outputs`` picks
  some; none: all.

The binary tensor data extension, as ``tritonclient`` uses it by default: an input whose
``parameters`` hold ``binary_data_size`` is read from the bytes after the JSON header
(its length in the ``Inference-Header-Content-Length`` header), row-major little-endian
(``BYTES``: each element a 4-byte little-endian length and its bytes); an output is sent
the same way when its ``parameters`` ask for ``binary_data``, or all of them with the
request's ``binary_data_output``.  Anything a client gets wrong is a 400 whose ``error``
names it; the same limits as v1 (body size, instances) hold.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from streamtrain.serve.model import InputError, ServedModel
from streamtrain.streams.errors import DecodeError

__all__ = ["add_routes", "answer", "infer", "metadata", "rows", "tensors"]

NUMERIC = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}
DATATYPE = {np.dtype(t): name for name, t in NUMERIC.items()}
HEADER = "Inference-Header-Content-Length"


def outputs_of(m: ServedModel) -> list[tuple[str, str, list[int]]]:
    """The version's output tensors: (name, datatype, shape), -1 for the batch."""
    if m.task == "regression":
        return [("prediction", "FP32", [-1])]
    label = ("class", "BYTES" if m.classes else "INT64", [-1])
    if m.task == "binary":
        return [("probability", "FP32", [-1]), label]
    return [("probabilities", "FP32", [-1, int(m.spec["outputs"].get("num_classes") or 0)]), label]


def inputs_of(m: ServedModel) -> list[tuple[str, str, list[int]]]:
    out = [("features", "FP32", [-1, m.width])]
    if m.fields.categorical:
        out.append(("categorical", "BYTES", [-1, len(m.fields.categorical)]))
    return out


def metadata(m: ServedModel) -> dict[str, Any]:
    """``GET /v2/models/{name}``: the model's tensors, and streamtrain's own fields beside them."""
    return {
        "name": m.name,
        "versions": [str(m.version)],
        "platform": "pytorch_streamtrain",
        "inputs": [{"name": n, "datatype": d, "shape": s} for n, d, s in inputs_of(m)],
        "outputs": [{"name": n, "datatype": d, "shape": s} for n, d, s in outputs_of(m)],
        "parameters": {
            "task": m.task,
            "features": list(m.features),
            "categorical": list(m.fields.categorical),
            "classes": list(m.classes),
            "missing": "impute" if m.impute else "reject",
        },
    }


# ---------------------------------------------------------------------- a request
def _split(raw: bytes, header_length: str | None) -> tuple[dict, memoryview]:
    """The JSON header of a request and the binary bytes after it."""
    if header_length is None:
        cut = len(raw)
    elif header_length.isdigit() and int(header_length) <= len(raw):
        cut = int(header_length)
    else:
        raise InputError(f"{HEADER}: must be the length of the JSON header, at most the body's {len(raw)} bytes, got {header_length!r}")
    try:
        doc = json.loads(bytes(raw[:cut]))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"body: the JSON header is not valid JSON ({exc})") from exc
    except RecursionError as exc:
        raise InputError("body: JSON nested too deeply") from exc
    if not isinstance(doc, dict):
        raise InputError('body: must be a JSON object {"inputs": [...]}')
    return doc, memoryview(raw)[cut:]


def _shape(t: dict, where: str) -> list[int]:
    shape = t.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise InputError(f"{where}.shape: must be a list of non-negative integers, got {shape!r}")
    return shape


def _flat(data: Any, count: int, where: str) -> list:
    """JSON ``data``: flat, or nested lists row-major; ``count`` elements."""
    if not isinstance(data, list):
        raise InputError(f"{where}.data: must be a list, got {type(data).__name__}")
    if data and isinstance(data[0], list):
        flat: list = []
        for i, row in enumerate(data):
            if not isinstance(row, list):
                raise InputError(f"{where}.data[{i}]: rows must all be lists")
            flat.extend(row)
        data = flat
    if len(data) != count:
        raise InputError(f"{where}.data: {count} elements for its shape, got {len(data)}")
    return data


def _numbers(t: dict, where: str, binary: memoryview | None, n: int, width: int, impute: bool) -> np.ndarray:
    datatype = t.get("datatype")
    if datatype not in NUMERIC:
        raise InputError(f"{where}.datatype: must be a numeric datatype ({', '.join(NUMERIC)}), got {datatype!r}")
    count = n * width
    if binary is not None:
        dtype = np.dtype(NUMERIC[datatype]).newbyteorder("<")
        if len(binary) != count * dtype.itemsize:
            raise InputError(f"{where}: {count} {datatype} values are {count * dtype.itemsize} bytes, got {len(binary)}")
        with np.errstate(over="ignore"):
            x = np.frombuffer(binary, dtype=dtype).astype(np.float32)
    else:
        values = _flat(t.get("data"), count, where)
        for k, v in enumerate(values):
            if v is None and impute:
                continue
            if type(v) is not float and type(v) is not int and type(v) is not bool:
                what = "null (this model does not impute missing numbers)" if v is None else type(v).__name__
                raise InputError(f"{where}.data[{k}]: must be a number, got {what}")
        try:
            with np.errstate(over="ignore"):
                x = np.array([np.nan if v is None else v for v in values], dtype=np.float32)
        except OverflowError as exc:
            raise InputError(f"{where}.data: a value is out of range") from exc
    x = x.reshape(n, width)
    bad = ~np.isfinite(x) & ~(np.isnan(x) & impute)
    if bad.any():
        i, j = (int(v) for v in np.argwhere(bad)[0])
        why = "" if impute else " (NaN: this model does not impute missing numbers)"
        raise InputError(f"{where}: row {i}, column {j}: must be a finite number{why}")
    return x


def _strings(t: dict, where: str, binary: memoryview | None, count: int) -> list:
    if t.get("datatype") != "BYTES":
        raise InputError(f"{where}.datatype: must be BYTES, got {t.get('datatype')!r}")
    if binary is None:
        values = _flat(t.get("data"), count, where)
        for k, v in enumerate(values):
            if v is not None and not isinstance(v, str):
                raise InputError(f"{where}.data[{k}]: must be a string or null, got {type(v).__name__}")
        return values
    out, at = [], 0
    for k in range(count):
        if at + 4 > len(binary):
            raise InputError(f"{where}: its binary data ends before element {k} of {count}")
        (size,) = struct.unpack_from("<I", binary, at)
        if at + 4 + size > len(binary):
            raise InputError(f"{where}: element {k} runs past its binary data")
        out.append(bytes(binary[at + 4 : at + 4 + size]))
        at += 4 + size
    if at != len(binary):
        raise InputError(f"{where}: {len(binary) - at} bytes of binary data after its {count} elements")
    return out


def parse(doc: dict, tail: memoryview, m: ServedModel, max_instances: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """The request's rows: float32 (n, width), table rows (n, fields), and the header; :class:`InputError` for anything wrong."""
    return (*rows(tensors(doc, tail), m, max_instances), doc)


def tensors(doc: dict, tail: memoryview) -> dict[str, tuple[dict, str, memoryview | None]]:
    """The request's input tensors by name: (the tensor's JSON, where it is for an error, its binary data or None)."""
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InputError("inputs: must be a non-empty list of tensors")
    by_name: dict[str, tuple[dict, str, memoryview | None]] = {}
    at = 0
    for i, t in enumerate(inputs):
        where = f"inputs[{i}]"
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise InputError(f"{where}: must be an object with a name")
        size = (t.get("parameters") or {}).get("binary_data_size") if isinstance(t.get("parameters"), dict) else None
        binary = None
        if size is not None:
            if type(size) is not int or size < 0 or at + size > len(tail):
                raise InputError(f"{where}.parameters.binary_data_size: {size!r} bytes are not in the body after its JSON header")
            binary, at = tail[at : at + size], at + size
        by_name[t["name"]] = (t, f"{where} ({t['name']})", binary)
    if at != len(tail):
        raise InputError(f"body: {len(tail) - at} bytes after the JSON header that no input's binary_data_size accounts for")
    return by_name


def rows(by_name: dict[str, tuple[dict, str, memoryview | None]], m: ServedModel, max_instances: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 rows (n, width) and table rows (n, fields) from the input tensors; the one decoder of v2 requests (REST or gRPC)."""
    known = {n for n, _, _ in inputs_of(m)}
    extra = sorted(set(by_name) - known)
    if extra or "features" not in by_name or (m.fields.categorical and "categorical" not in by_name):
        raise InputError(f"inputs: this model takes {sorted(known)}, got {sorted(by_name)}")
    t, where, binary = by_name["features"]
    shape = _shape(t, where)
    if len(shape) != 2 or shape[1] != m.width or not 0 < shape[0] <= max_instances:
        raise InputError(f"{where}.shape: must be [n, {m.width}] with 0 < n <= {max_instances}, got {shape}")
    n = shape[0]
    x = _numbers(t, where, binary, n, m.width, m.impute)
    fields = len(m.fields.categorical)
    ids = np.empty((n, fields), np.int64)
    if fields:
        t, where, binary = by_name["categorical"]
        if _shape(t, where) != [n, fields]:
            raise InputError(f"{where}.shape: must be [{n}, {fields}] (one value per categorical field per row), got {t.get('shape')}")
        values = _strings(t, where, binary, n * fields)
        for j, c in enumerate(m.fields.categorical):
            column = values[j::fields]
            try:
                ids[:, j] = m.fields.rows(j, column)
            except DecodeError:
                limit = m.fields.max_category_bytes
                raise InputError(f"{where}: a value of field {c!r} is longer than {limit} bytes") from None
    return x, ids


def _requested(doc: dict, m: ServedModel) -> list[tuple[str, bool]]:
    """The outputs asked for, each with whether it goes binary."""
    params = doc.get("parameters") if isinstance(doc.get("parameters"), dict) else {}
    every = params.get("binary_data_output") is True
    names = [n for n, _, _ in outputs_of(m)]
    asked = doc.get("outputs")
    if asked is None:
        return [(n, every) for n in names]
    if not isinstance(asked, list):
        raise InputError("outputs: must be a list of {name}")
    out = []
    for i, o in enumerate(asked):
        if not isinstance(o, dict) or o.get("name") not in names:
            raise InputError(f"outputs[{i}]: must name one of {names}")
        p = o.get("parameters") if isinstance(o.get("parameters"), dict) else {}
        out.append((o["name"], p.get("binary_data", every) is True))
    return out


def answer(m: ServedModel, x: np.ndarray, ids: np.ndarray) -> dict[str, np.ndarray | list]:
    """Every output tensor of the version for these rows (``class`` with names: a list); :class:`InputError` if not finite."""
    with torch.inference_mode():
        out = m.module(torch.from_numpy(x), torch.from_numpy(ids) if m.fields.categorical else None).float()
    tensors: dict[str, np.ndarray | list] = {}
    if m.task == "regression":
        tensors["prediction"] = out.reshape(-1).numpy()
    elif m.task == "binary":
        logit = out.reshape(-1)
        tensors["probability"] = torch.sigmoid(logit).numpy()
        label = (logit > 0).long().numpy()
        tensors["class"] = [m.classes[c] for c in label] if m.classes else label
    else:
        tensors["probabilities"] = torch.softmax(out, dim=1).numpy()
        label = out.argmax(1).numpy()
        tensors["class"] = [m.classes[c] for c in label] if m.classes else label
    if any(isinstance(v, np.ndarray) and v.dtype.kind == "f" and not np.isfinite(v).all() for v in tensors.values()):
        raise InputError(f"inputs: the model's output is not a finite number for these inputs (version {m.version})")
    return tensors


def infer(m: ServedModel, raw: bytes, header_length: str | None, max_instances: int) -> tuple[bytes, dict[str, str], int]:
    """Worker or loop: the response body, its extra headers, and the instances answered."""
    doc, tail = _split(raw, header_length)
    x, ids, doc = parse(doc, tail, m, max_instances)
    requested = _requested(doc, m)
    answers = answer(m, x, ids)
    n = len(x)
    outputs, blobs = [], []
    for name, binary in requested:
        value = answers[name]
        shape = [n, *np.shape(value)[1:]] if isinstance(value, np.ndarray) else [n]
        datatype = "BYTES" if isinstance(value, list) else DATATYPE[value.dtype]
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
        if binary:
            blob = _bytes(value) if isinstance(value, list) else value.astype(value.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = value if isinstance(value, list) else value.reshape(-1).tolist()
        outputs.append(entry)
    body = {"model_name": m.name, "model_version": str(m.version), "outputs": outputs}
    if isinstance(doc.get("id"), str):
        body["id"] = doc["id"]
    header = json.dumps(body, allow_nan=False).encode()
    if not blobs:
        return header, {}, n
    return header + b"".join(blobs), {HEADER: str(len(header))}, n


def _bytes(values: list[str]) -> bytes:
    parts = []
    for v in values:
        b = v.encode()
        parts.append(struct.pack("<I", len(b)) + b)
    return b"".join(parts)


# ---------------------------------------------------------------------- the routes
def add_routes(app: FastAPI, watcher: Any, metrics: Any, version: str, max_body_bytes: int, max_instances: int, inline_bytes: int) -> None:
    """The v2 routes on ``app``, answering from ``watcher``'s current version as the v1 routes do."""
    from streamtrain.serve.app import read_body

    name = watcher.name

    def error(code: int, message: str) -> Response:
        return Response(json.dumps({"error": message}).encode(), status_code=code, media_type="application/json")

    def current(model: str, wanted: str | None) -> ServedModel | Response:
        m = watcher.current
        if model != name:
            return error(404, f"no model {model!r} here; this server serves {name!r}")
        if m is None:
            return error(503, f"no valid version of {name!r} in {watcher.root} yet")
        if wanted is not None and wanted != str(m.version):
            return error(404, f"version {wanted} of {name!r} is not loaded; this server serves version {m.version}")
        return m

    @app.get("/v2/health/live", summary="v2: liveness")
    async def live() -> Response:
        ok = watcher.alive()
        return Response(json.dumps({"live": ok}).encode(), status_code=200 if ok else 503, media_type="application/json")

    @app.get("/v2/health/ready", summary="v2: readiness (a version is loaded)")
    async def ready() -> Response:
        ok = watcher.current is not None
        return Response(json.dumps({"ready": ok}).encode(), status_code=200 if ok else 503, media_type="application/json")

    @app.get("/v2", summary="v2: server metadata")
    async def server() -> Response:
        doc = {"name": "streamtrain", "version": version, "extensions": ["binary_tensor_data"]}
        return Response(json.dumps(doc).encode(), media_type="application/json")

    for suffix in ("", "/versions/{model_version}"):

        @app.get(f"/v2/models/{{model}}{suffix}", summary="v2: model metadata")
        async def model_metadata(model: str, model_version: str | None = None) -> Response:
            m = current(model, model_version)
            return m if isinstance(m, Response) else Response(json.dumps(metadata(m)).encode(), media_type="application/json")

        @app.get(f"/v2/models/{{model}}{suffix}/ready", summary="v2: model readiness")
        async def model_ready(model: str, model_version: str | None = None) -> Response:
            m = current(model, model_version)
            if isinstance(m, Response):
                return m
            return Response(json.dumps({"name": name, "ready": True}).encode(), media_type="application/json")

        @app.post(f"/v2/models/{{model}}{suffix}/infer", summary="v2: inference")
        async def model_infer(model: str, request: Request, model_version: str | None = None) -> Response:
            m = current(model, model_version)
            if isinstance(m, Response):
                return m
            raw = await read_body(request, max_body_bytes)
            if isinstance(raw, Response):
                return raw
            header = request.headers.get(HEADER)
            try:
                if len(raw) <= inline_bytes:
                    body, headers, n = infer(m, raw, header, max_instances)
                else:
                    body, headers, n = await run_in_threadpool(infer, m, raw, header, max_instances)
            except InputError as exc:
                return error(400, str(exc))
            metrics.instances.inc(n)
            media = "application/octet-stream" if headers else "application/json"
            return Response(body, headers=headers, media_type=media)
