"""One published version, loaded for serving: verified, validated, and turned into predictions.

:func:`load_version` trusts nothing it has not checked: the manifest's sizes and sha256,
the sidecar, the weights loaded with ``torch.load(weights_only=True)`` (a planted pickle
cannot run code) into the model class the sidecar names, and a probe batch whose outputs
must be finite and of the task's shape.  A version that fails any of these raises
:class:`VersionRefused` and is never served.

:meth:`ServedModel.predict` applies exactly what the trainer does, through the same code:
:class:`streamtrain.models.served.Served` (the running standardization, a missing number's
mean and mark, the model in eval mode, for regression the label's ``output * std + mean``)
over rows that :func:`parse_instances` builds as the decoders do (categorical values hashed
by :class:`streamtrain.streams.features.FeatureSpec`, ``null`` or absent numbers missing
when the model was trained so, true/false 1/0); classification answers the class (by name
when the model has ``trainer.classes``) and its probabilities.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamtrain.models.registry import Inputs, build_model
from streamtrain.models.served import Served
from streamtrain.serve.repository import RepositoryError, verify
from streamtrain.streams.errors import DecodeError, StreamtrainError
from streamtrain.streams.features import MISSING_NUMBER, FeatureSpec

__all__ = ["InputError", "ServedModel", "VersionRefused", "load_version", "parse_instances"]

WEIGHTS = "model.pt"
SIDECAR = "model.pt.json"
PROBE_ROWS = 8


class VersionRefused(StreamtrainError):
    """A version that must not be served: unverifiable, unloadable, or giving non-finite outputs."""


class InputError(ValueError):
    """A request the model cannot take; the message names the field (``instances[3].temp: missing feature``)."""


@dataclass(frozen=True)
class ServedModel:
    """A version ready to answer: the module and the sidecar's numbers, as tensors."""

    name: str
    version: int
    path: Path
    module: Served  # standardization (and imputation), the model, the label's units
    features: tuple[str, ...]  # feature names in the model's order; () when the data had a feature_field
    feature_field: str | None
    width: int
    task: str
    mean: torch.Tensor
    scale: torch.Tensor
    y_mean: float
    y_std: float
    created: float  # when the snapshot it came from was written (Unix time)
    loaded: float
    spec: dict
    fields: FeatureSpec = field(default_factory=FeatureSpec)  # the categorical fields and their hash; whether missing numbers are imputed
    classes: tuple[str, ...] = ()  # class names (trainer.classes): the answers name them

    @property
    def impute(self) -> bool:
        return self.fields.impute

    def predict(self, x: np.ndarray, ids: np.ndarray | None = None, probabilities: bool = False) -> list[Any]:
        """Predictions for raw feature rows ``x`` (n, width; NaN where missing) and table rows ``ids``, as JSON-ready values.

        With class names a prediction is the name, or with ``probabilities`` the name and the probability of each by name.
        """
        with torch.inference_mode():
            out = self.module(torch.from_numpy(x), torch.from_numpy(ids) if self.fields.categorical else None)
            if self.task == "regression":
                return out.reshape(-1).tolist()
            if self.task == "binary":
                logit = out.reshape(-1)
                p1 = torch.sigmoid(logit).tolist()
                pairs = [(int(z > 0), [1.0 - p, p]) for z, p in zip(logit.tolist(), p1)]
            else:
                probs = torch.softmax(out, dim=1)
                pairs = list(zip(out.argmax(1).tolist(), probs.tolist()))
        if not self.classes:
            return [{"class": c, "probabilities": p} for c, p in pairs]
        if not probabilities:
            return [self.classes[c] for c, _ in pairs]
        return [{"class": self.classes[c], "probabilities": dict(zip(self.classes, p))} for c, p in pairs]

    def status(self) -> dict[str, Any]:
        """What ``GET /v1/models/{name}`` tells about this version."""
        snap = self.spec.get("snapshot", {})
        return {
            "version": str(self.version),
            "task": self.task,
            "features": list(self.features) or None,
            "feature_field": self.feature_field,
            "num_features": self.width,
            "model": self.spec["model"]["name"],
            "snapshot": snap.get("name"),
            "created": self.created,
            "age_seconds": round(time.time() - self.created, 3),
            "loaded": self.loaded,
            "prequential": snap.get("prequential"),
        }


def load_version(path: str | Path, name: str, runtime: str = "torch", threads: int = 1) -> ServedModel:
    """Load and validate one version directory; :class:`VersionRefused` says why it cannot be served."""
    path = Path(path)
    try:
        manifest = verify(path)
    except RepositoryError as exc:
        raise VersionRefused(str(exc)) from exc
    if WEIGHTS not in manifest["files"] or SIDECAR not in manifest["files"]:
        raise VersionRefused(f"the manifest does not list {WEIGHTS} and {SIDECAR}")
    try:
        spec = json.loads((path / SIDECAR).read_text())
        model_name, params = spec["model"]["name"], dict(spec["model"]["params"])
        inputs, outputs = spec["inputs"], spec["outputs"]
        width = int(inputs.get("num_features", spec["model"]["in_features"]))  # raw numbers (the model may take their marks too)
        task = str(outputs["task"])
        mean = torch.tensor(inputs["standardize"]["mean"], dtype=torch.float32)
        scale = torch.tensor(inputs["standardize"]["scale"], dtype=torch.float32)
        dst = outputs.get("destandardize") or {"mean": 0.0, "std": 1.0}
        y_mean, y_std = float(dst["mean"]), float(dst["std"])
        fitted = outputs.get("calibration")  # a temperature fitted online: the logits times logit_scale
        logit_scale = float(fitted["logit_scale"]) if fitted else None
        features = tuple(str(f) for f in inputs.get("features") or ())
        created = float(spec.get("snapshot", {}).get("created") or manifest.get("created") or 0.0)
        hashing = inputs.get("hash") or {}
        fields = FeatureSpec(
            numbers=features,
            categorical=tuple(str(c) for c in inputs.get("categorical") or ()),
            buckets=int(hashing.get("buckets") or 1),
            missing=str(inputs.get("missing", "reject")),
            max_category_bytes=int(hashing.get("max_category_bytes") or 256),
        )
        model_inputs = Inputs(**spec["model"]["inputs"]) if "inputs" in spec["model"] else Inputs(width)
        classes = tuple(str(c) for c in outputs.get("classes") or ())
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise VersionRefused(f"{SIDECAR} unreadable: {exc!r}") from exc
    if spec.get("format") != "state_dict":
        raise VersionRefused(f"{SIDECAR} describes format {spec.get('format')!r}, not state_dict")
    if task not in ("regression", "binary", "multiclass"):
        raise VersionRefused(f"{SIDECAR}: unknown task {task!r}")
    if mean.shape != (width,) or scale.shape != (width,) or (features and len(features) != width):
        raise VersionRefused(f"{SIDECAR}: the standardization or feature list does not have the model's {width} inputs")
    if not (torch.isfinite(mean).all() and torch.isfinite(scale).all() and math.isfinite(y_mean) and math.isfinite(y_std)):
        raise VersionRefused(f"{SIDECAR}: non-finite standardization")
    if logit_scale is not None and not (math.isfinite(logit_scale) and logit_scale > 0):
        raise VersionRefused(f"{SIDECAR}: outputs.calibration.logit_scale must be a positive number, got {logit_scale}")
    try:
        weights = torch.load(path / WEIGHTS, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise VersionRefused(f"refused to load {WEIGHTS} with weights_only=True: {str(exc).splitlines()[0][:300]}") from exc
    try:
        model = build_model(model_name, params, model_inputs)
        model.load_state_dict(weights)
    except Exception as exc:
        raise VersionRefused(f"the weights do not fit model {model_name!r} {params}: {str(exc).splitlines()[0][:300]}") from exc
    destandardize = (torch.tensor([y_mean]), torch.tensor([y_std])) if task == "regression" else (None, None)
    module = Served(
        model, mean, scale, *destandardize, missing=fields.impute, takes_ids=bool(fields.categorical), logit_scale=logit_scale
    ).eval()
    if runtime == "onnx":
        module = _onnx_module(path, manifest, module, threads, len(fields.categorical), fields.buckets)
    for p in module.parameters():
        p.requires_grad_(False)
    served = ServedModel(
        name=name,
        version=int(manifest["version"]),
        path=path,
        module=module,
        features=features,
        feature_field=inputs.get("feature_field"),
        width=width,
        task=task,
        mean=mean,
        scale=scale,
        y_mean=y_mean,
        y_std=y_std,
        created=created,
        loaded=time.time(),
        spec=spec,
        fields=fields,
        classes=classes,
    )
    _probe(served, int(outputs.get("num_classes") or 0))
    return served


class OnnxModule:
    """``model.onnx`` in onnxruntime, called as the torch module is: raw rows (and table rows) in, a tensor out."""

    def __init__(self, session, torch_module: Served) -> None:
        self.session = session
        self.names = [i.name for i in session.get_inputs()]
        self.mean, self.scale, self.missing = torch_module.mean, torch_module.scale, torch_module.missing

    def __call__(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        feed = {self.names[0]: x.numpy()}
        if len(self.names) > 1:
            feed[self.names[1]] = ids.numpy()
        return torch.from_numpy(self.session.run(None, feed)[0])

    def parameters(self):
        return iter(())


def _onnx_module(path: Path, manifest: dict, module: Served, threads: int, fields: int, buckets: int) -> OnnxModule:
    """``streamtrain serve --runtime onnx``: the version's model.onnx, checked against its torch module before it serves."""
    if "model.onnx" not in manifest["files"]:
        raise VersionRefused("--runtime onnx: the version has no model.onnx (publish.onnx was off, or its export failed)")
    try:
        import onnxruntime as ort

        from streamtrain.models.onnx_export import OnnxMismatch, check, probe_inputs
    except ImportError as exc:
        raise VersionRefused(f"--runtime onnx: {exc}; pip install 'streamtrain[onnx]'") from exc
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, threads)
    try:
        session = ort.InferenceSession(str(path / "model.onnx"), options, providers=["CPUExecutionProvider"])
        onnx = OnnxModule(session, module)
        check(module, path / "model.onnx", probe_inputs(module, module.mean.shape[0], fields, buckets))
    except OnnxMismatch as exc:
        raise VersionRefused(f"model.onnx does not match the weights: {exc}") from exc
    except Exception as exc:
        raise VersionRefused(f"onnxruntime refused model.onnx: {str(exc).splitlines()[0][:300]}") from exc
    return onnx


def _probe(m: ServedModel, num_classes: int) -> None:
    """A batch around the training data's mean must give finite outputs of the task's shape."""
    g = torch.Generator().manual_seed(0)
    spread = torch.where(m.scale > 0, 1.0 / m.scale.clamp_min(1e-30), torch.ones_like(m.scale))
    x = m.mean + torch.randn(PROBE_ROWS, m.width, generator=g) * spread
    if m.impute and m.width:
        x[0, 0] = float("nan")  # a missing number too
    fields = len(m.fields.categorical)
    ids = torch.randint(0, max(1, m.fields.buckets), (PROBE_ROWS, fields), generator=g) if fields else None
    want = num_classes if m.task == "multiclass" else 1
    try:
        with torch.inference_mode():
            out = m.module(x, ids)
    except Exception as exc:
        raise VersionRefused(f"the model fails on a probe batch: {str(exc).splitlines()[0][:300]}") from exc
    got = 1 if out.dim() == 1 else out.shape[-1]
    if out.dim() > 2 or out.shape[0] != PROBE_ROWS or (want and got != want):
        raise VersionRefused(
            f"the model gives outputs of shape {tuple(out.shape)} for {PROBE_ROWS} rows; task {m.task} needs ({PROBE_ROWS}, {want})"
        )
    if not torch.isfinite(out).all():
        raise VersionRefused("non-finite outputs on a probe batch")


def parse_instances(body: Any, m: ServedModel, max_instances: int) -> tuple[np.ndarray, np.ndarray]:
    """``{"instances": [...]}`` -> float32 rows (n, width; NaN where missing) and table rows (n, fields), or :class:`InputError`.

    An instance is an object of feature values by name (other keys are ignored, so a whole
    record can be sent), an object ``{feature_field: [...]}`` for a model trained on one
    list field, or a list of numbers in the model's feature order (a model without
    categorical fields).  As in training: true/false are 1/0, a categorical value is a
    string, integer or boolean (``null`` or absent: its field's missing value), and a number
    that is ``null`` or absent is missing when the model was trained to impute it.
    """
    if not isinstance(body, dict) or "instances" not in body:
        raise InputError('body: must be a JSON object {"instances": [...]}')
    rows = body["instances"]
    if not isinstance(rows, list) or not rows:
        raise InputError("instances: must be a non-empty list")
    if len(rows) > max_instances:
        raise InputError(f"instances: at most {max_instances} per request, got {len(rows)}")
    out = np.empty((len(rows), m.width), dtype=np.float32)
    names, cats = m.features, m.fields.categorical
    categories: list[list[Any]] = [[None] * len(rows) for _ in cats]
    for i, row in enumerate(rows):
        if isinstance(row, dict):
            for j, c in enumerate(cats):
                categories[j][i] = row.get(c)
            if names:
                values = []
                for f in names:
                    v = row.get(f, _MISSING)
                    if v is _MISSING or v is None:
                        if not m.impute:
                            raise InputError(
                                f"instances[{i}].{f}: missing feature"
                                if v is _MISSING
                                else f"instances[{i}].{f}: must be a number, got null"
                            )
                        v = MISSING_NUMBER
                    elif type(v) is bool:
                        v = float(v)
                    elif type(v) is not float and type(v) is not int:
                        raise InputError(f"instances[{i}].{f}: must be a number, got {_kind(v)}")
                    values.append(v)
                row = values
            elif m.feature_field and m.feature_field in row:
                row, where = row[m.feature_field], f"instances[{i}].{m.feature_field}"
                _check_list(row, m.width, where)
            elif m.width:
                raise InputError(f"instances[{i}]: this model has no feature names; send a list of {m.width} numbers")
            else:
                row = []
        elif cats:
            raise InputError(f"instances[{i}]: this model has categorical fields {list(cats)[:5]}; send an object of fields by name")
        else:
            _check_list(row, m.width, f"instances[{i}]")
        try:
            with np.errstate(over="ignore"):
                out[i] = row  # beyond float32: inf, refused below
        except OverflowError as exc:  # an int beyond float64
            raise InputError(f"instances[{i}]: a value is out of range") from exc
    bad = ~(np.isfinite(out) | _marked(out))
    if bad.any():
        i, j = (int(v) for v in np.argwhere(bad)[0])
        raise InputError(
            f"instances[{i}].{names[j]}: must be a finite number" if names else f"instances[{i}][{j}]: must be a finite number"
        )
    out[_marked(out)] = np.nan
    ids = np.empty((len(rows), len(cats)), np.int64)
    for j, c in enumerate(cats):
        try:
            ids[:, j] = m.fields.rows(j, categories[j])
        except DecodeError:
            i = next(k for k, v in enumerate(categories[j]) if not _category_ok(v, m.fields.max_category_bytes))
            raise InputError(
                f"instances[{i}].{c}: must be a string, an integer or a boolean of at most {m.fields.max_category_bytes} bytes, "
                f"got {_kind(categories[j][i])}"
            ) from None
    return out, ids


def _marked(x: np.ndarray) -> np.ndarray:
    return x.view(np.uint32) == np.uint32(0x7FC0DEAD)


def _category_ok(v: Any, limit: int) -> bool:
    from streamtrain.streams.features.hashing import canonical

    if v is None:
        return True
    try:
        return len(canonical(v)) <= limit
    except TypeError:
        return False


_MISSING = object()


def _check_list(row: Any, width: int, where: str) -> None:
    if not isinstance(row, list):
        raise InputError(f"{where}: must be an object of features by name or a list of {width} numbers, got {_kind(row)}")
    if len(row) != width:
        raise InputError(f"{where}: must have {width} values (the model's features), got {len(row)}")
    for j, v in enumerate(row):
        if type(v) is not float and type(v) is not int:
            raise InputError(f"{where}[{j}]: must be a number, got {_kind(v)}")


def _kind(v: Any) -> str:
    return {bool: "a boolean", str: "a string", type(None): "null", list: "a list", dict: "an object"}.get(type(v), type(v).__name__)
