"""One published version, loaded for serving: verified, validated, and turned into predictions.

:func:`load_version` trusts nothing it has not checked: the manifest's sizes and sha256,
the sidecar, the weights loaded with ``torch.load(weights_only=True)`` (a planted pickle
cannot run code) into the model class the sidecar names, and a probe batch whose outputs
must be finite and of the task's shape.  A version that fails any of these raises
:class:`VersionRefused` and is never served.

:meth:`ServedModel.predict` applies exactly what the trainer does: the sidecar's running
standardization ``(x - mean) * scale``, the model in eval mode, and for regression the
label's ``output * std + mean``; classification answers the class and its probabilities.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamtrain.models.registry import build_model
from streamtrain.serve.repository import RepositoryError, verify
from streamtrain.streams.errors import StreamtrainError

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
    module: torch.nn.Module
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

    def predict(self, x: np.ndarray) -> list[Any]:
        """Predictions for raw feature rows ``x`` (n, width), as JSON-ready values."""
        with torch.inference_mode():
            out = self.module((torch.from_numpy(x) - self.mean) * self.scale)
            if self.task == "regression":
                return (out.reshape(-1) * self.y_std + self.y_mean).tolist()
            if self.task == "binary":
                logit = out.reshape(-1)
                p1 = torch.sigmoid(logit).tolist()
                return [{"class": int(z > 0), "probabilities": [1.0 - p, p]} for z, p in zip(logit.tolist(), p1)]
            probs = torch.softmax(out, dim=1)
            return [{"class": c, "probabilities": p} for c, p in zip(out.argmax(1).tolist(), probs.tolist())]

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


def load_version(path: str | Path, name: str) -> ServedModel:
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
        model_name, params, width = spec["model"]["name"], dict(spec["model"]["params"]), int(spec["model"]["in_features"])
        inputs, outputs = spec["inputs"], spec["outputs"]
        task = str(outputs["task"])
        mean = torch.tensor(inputs["standardize"]["mean"], dtype=torch.float32)
        scale = torch.tensor(inputs["standardize"]["scale"], dtype=torch.float32)
        dst = outputs.get("destandardize") or {"mean": 0.0, "std": 1.0}
        y_mean, y_std = float(dst["mean"]), float(dst["std"])
        features = tuple(str(f) for f in inputs.get("features") or ())
        created = float(spec.get("snapshot", {}).get("created") or manifest.get("created") or 0.0)
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
    try:
        weights = torch.load(path / WEIGHTS, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise VersionRefused(f"refused to load {WEIGHTS} with weights_only=True: {str(exc).splitlines()[0][:300]}") from exc
    try:
        module = build_model(model_name, params, width)
        module.load_state_dict(weights)
    except Exception as exc:
        raise VersionRefused(f"the weights do not fit model {model_name!r} {params}: {str(exc).splitlines()[0][:300]}") from exc
    module.eval()
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
    )
    _probe(served, int(outputs.get("num_classes") or 0))
    return served


def _probe(m: ServedModel, num_classes: int) -> None:
    """A batch around the training data's mean must give finite outputs of the task's shape."""
    g = torch.Generator().manual_seed(0)
    spread = torch.where(m.scale > 0, 1.0 / m.scale.clamp_min(1e-30), torch.ones_like(m.scale))
    x = m.mean + torch.randn(PROBE_ROWS, m.width, generator=g) * spread
    want = num_classes if m.task == "multiclass" else 1
    try:
        with torch.inference_mode():
            out = m.module((x - m.mean) * m.scale)
    except Exception as exc:
        raise VersionRefused(f"the model fails on a probe batch: {str(exc).splitlines()[0][:300]}") from exc
    got = 1 if out.dim() == 1 else out.shape[-1]
    if out.dim() > 2 or out.shape[0] != PROBE_ROWS or (want and got != want):
        raise VersionRefused(
            f"the model gives outputs of shape {tuple(out.shape)} for {PROBE_ROWS} rows; task {m.task} needs ({PROBE_ROWS}, {want})"
        )
    if not torch.isfinite(out).all():
        raise VersionRefused("non-finite outputs on a probe batch")


def parse_instances(body: Any, m: ServedModel, max_instances: int) -> np.ndarray:
    """``{"instances": [...]}`` -> a float32 array (n, width), or :class:`InputError` naming the field.

    An instance is an object of feature values by name (other keys are ignored, so a whole
    record can be sent), an object ``{feature_field: [...]}`` for a model trained on one
    list field, or a list of numbers in the model's feature order.
    """
    if not isinstance(body, dict) or "instances" not in body:
        raise InputError('body: must be a JSON object {"instances": [...]}')
    rows = body["instances"]
    if not isinstance(rows, list) or not rows:
        raise InputError("instances: must be a non-empty list")
    if len(rows) > max_instances:
        raise InputError(f"instances: at most {max_instances} per request, got {len(rows)}")
    out = np.empty((len(rows), m.width), dtype=np.float32)
    names = m.features
    for i, row in enumerate(rows):
        if isinstance(row, dict):
            if names:
                values = []
                for f in names:
                    v = row.get(f, _MISSING)
                    if v is _MISSING:
                        raise InputError(f"instances[{i}].{f}: missing feature")
                    if type(v) is not float and type(v) is not int:
                        raise InputError(f"instances[{i}].{f}: must be a number, got {_kind(v)}")
                    values.append(v)
                row = values
            elif m.feature_field and m.feature_field in row:
                row, where = row[m.feature_field], f"instances[{i}].{m.feature_field}"
                _check_list(row, m.width, where)
            else:
                raise InputError(f"instances[{i}]: this model has no feature names; send a list of {m.width} numbers")
        else:
            _check_list(row, m.width, f"instances[{i}]")
        try:
            with np.errstate(over="ignore"):
                out[i] = row  # beyond float32: inf, refused below
        except OverflowError as exc:  # an int beyond float64
            raise InputError(f"instances[{i}]: a value is out of range") from exc
    bad = ~np.isfinite(out)
    if bad.any():
        i, j = (int(v) for v in np.argwhere(bad)[0])
        raise InputError(
            f"instances[{i}].{names[j]}: must be a finite number" if names else f"instances[{i}][{j}]: must be a finite number"
        )
    return out


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
