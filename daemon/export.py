"""Export a snapshot's model for serving: weights a process without streamtrain can load.

Two forms, each with a JSON sidecar (``model.pt`` -> ``model.pt.json``) that says what the
model expects and gives back:

* ``state_dict`` (default): ``torch.save`` of the model's ``state_dict`` only, loadable
  with ``torch.load(path, weights_only=True)`` into the model class (``models/*.py``
  are self-contained: copy the one file).  The trainer standardizes features with
  running statistics, so the sidecar carries them: ``x_std = (x - mean) * scale``.
  For regression the model is trained on the standardized label (unless
  ``trainer.standardize_target`` is off), so its raw output is in standardized units and
  the sidecar's ``outputs.destandardize`` gives them back in label units:
  ``y = output * std + mean``.
* ``program``: a ``torch.export`` program of standardization + model (+ for regression
  the de-standardization of the output), loadable with ``torch.export.load(path).module()``
  and no model code at all; it takes raw features and gives what the trainer predicts
  (for regression: in the label's units).
* ``onnx``: the same as ONNX (``models/onnx_export.py``, the ``onnx`` extra), checked with
  onnxruntime against torch on a probe batch before it is kept; the categorical hashing
  stays outside the graph (it takes the table rows).

The numbers are the trainer's own float32 statistics (``RunningStandardizer.shift``,
``.scale`` and ``.std``), so either form reproduces the trainer's prediction exactly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from streamtrain.daemon.normalizer import RunningStandardizer
from streamtrain.daemon.snapshot import SnapshotInfo
from streamtrain.models.registry import build_model, resolve
from streamtrain.models.served import Served

__all__ = ["EXPORT_FORMATS", "export_model", "serving_spec", "sidecar_path", "standardization", "target_standardization"]

EXPORT_FORMATS = ("state_dict", "program", "onnx")
# 2: outputs.destandardize (regression trains on the standardized label); 3: categorical, missing, classes;
# 4: outputs.calibration (a fitted temperature)
SPEC_VERSION = 4

_OUTPUTS = {
    "regression": "one value per sample: output * std + mean (outputs.destandardize) is the prediction in the label's units; "
    "the model learns the standardized label, and the program format already includes this step",
    "binary": "one logit per sample: sigmoid(output) is the probability of label 1",
    "multiclass": "one logit per class per sample: softmax(output) gives the class probabilities",
}


def sidecar_path(out: str | os.PathLike[str]) -> Path:
    """``model.pt`` -> ``model.pt.json``: one sidecar per exported file, whatever its suffix."""
    return Path(f"{out}.json")


def standardization(meta: dict, state: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, scale) such that ``(x - mean) * scale`` is exactly what the trainer fed the model."""
    cfg = meta["config"]
    norm = RunningStandardizer(_width(meta), enabled=bool(cfg["trainer"].get("standardize", True)), missing=_missing(meta))
    if norm.enabled and "normalizer" in state:
        norm.load_state_dict(state["normalizer"])
    return norm.shift.clone(), norm.scale.clone()  # disabled: zeros and ones, the identity


def model_inputs_of(meta: dict):
    """What the snapshot's model was built to take (its config's data and trainer sections)."""
    from streamtrain.models.registry import Inputs

    cfg = meta["config"]
    data, tc = cfg["data"], cfg["trainer"]
    width, marks = _width(meta), (_width(meta) if _missing(meta) else 0)
    classes = int(tc.get("num_classes") or len(tc.get("classes") or ())) if tc.get("task") == "multiclass" else 0
    cats = list(data.get("categorical") or [])
    return Inputs(width + marks, len(cats), int(data.get("hash_buckets") or 0) if cats else 0, marks, classes)


def target_standardization(meta: dict, state: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std), each of shape (1,), such that ``output * std + mean`` is the trainer's prediction in label units.

    Only regression standardizes its label (``trainer.standardize_target``, default on);
    otherwise, and for snapshots written before the label was standardized (no
    ``state["target"]``), the identity: mean 0, std 1.
    """
    tc = meta["config"]["trainer"]
    target = RunningStandardizer(1, enabled=tc.get("task") == "regression" and bool(tc.get("standardize_target", True)))
    if target.enabled and "target" in state:
        target.load_state_dict(state["target"])
    return target.shift.clone(), target.std.clone()  # otherwise zero and one, the identity


def serving_spec(info: SnapshotInfo, state: dict, fmt: str, weights_file: str) -> dict[str, Any]:
    """The sidecar: model, inputs (feature order, standardization), outputs, and where it came from."""
    meta = info.meta
    cfg = meta["config"]
    name, params = cfg["model"]["name"], dict(cfg["model"].get("params") or {})
    _, cls = resolve(name)
    mean, scale = standardization(meta, state)
    y_mean, y_std = target_standardization(meta, state)
    data, trainer = cfg["data"], cfg["trainer"]
    return {
        "streamtrain_export": SPEC_VERSION,
        "format": fmt,
        "weights": weights_file,
        "model": {
            "name": name,
            "class": f"{cls.__module__}:{cls.__qualname__}",
            "params": params,
            "in_features": model_inputs_of(meta).in_features,  # the numbers, then with missing: impute their 0/1 marks
            "inputs": dict(model_inputs_of(meta).__dict__),
        },
        "inputs": {
            "features": list(data.get("features") or []),
            "feature_field": data.get("feature_field"),
            "num_features": _width(meta),
            "categorical": list(data.get("categorical") or []),
            "hash": {
                "name": "streamtrain hash v1 (docs/LEARNING.md, Categorical features)",
                "buckets": int(data.get("hash_buckets") or 0),
                "max_category_bytes": int(data.get("max_category_bytes") or 256),
            },
            "missing": "impute" if _missing(meta) else "reject",
            "model_inputs": (
                "cat([where(isnan(x), 0, x_std), isnan(x)]): a missing number (NaN) is its running mean, its mark 1"
                if _missing(meta)
                else "x_std"
            ),
            "standardize": {
                "included_in_program": fmt in ("program", "onnx"),
                "formula": "x_std = (x - mean) * scale",
                "mean": [float(v) for v in mean],
                "scale": [float(v) for v in scale],
            },
        },
        "outputs": {
            "task": trainer["task"],
            "num_classes": trainer.get("num_classes", 0),
            "classes": list(trainer.get("classes") or []),
            "meaning": _OUTPUTS.get(trainer["task"], ""),
            "destandardize": {
                "included_in_program": fmt in ("program", "onnx"),
                "formula": "y = output * std + mean",
                "mean": float(y_mean[0]),
                "std": float(y_std[0]),
            },
            **(
                {
                    "calibration": {
                        "included_in_program": fmt in ("program", "onnx"),
                        "formula": "logits = output * logit_scale (1 / the temperature fitted online), then sigmoid or softmax",
                        "logit_scale": logit_scale(state),
                    }
                }
                if logit_scale(state) is not None
                else {}
            ),
        },
        "label": data.get("label"),
        "snapshot": {
            "name": info.name,
            "step": info.step,
            "created": info.created,
            "samples": meta.get("samples"),
            "loss_ewma": meta.get("loss_ewma"),
            "metric": meta.get("metric"),
            "prequential": meta.get("prequential"),
        },
        "versions": {**meta.get("versions", {}), "torch_export": torch.__version__},
    }


def export_model(info: SnapshotInfo, state: dict, out: str | os.PathLike[str], fmt: str = "state_dict") -> dict[str, Any]:
    """Write the model of a loaded snapshot to ``out`` (and its sidecar); returns the sidecar."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().to("cpu").clone() for k, v in state["model"].items()}
    extra = {}
    if fmt == "state_dict":
        torch.save(weights, out)
    elif fmt == "program":
        torch.export.save(_program(info.meta, state, weights), out)
    else:
        from streamtrain.models.onnx_export import ATOL, RTOL, export_onnx

        inputs = model_inputs_of(info.meta)
        diff = export_onnx(served_module(info.meta, state, weights), out, _width(info.meta), inputs.categorical, inputs.buckets)
        extra["onnx"] = {
            "inputs": ["x: float32 [batch, num_features], NaN where missing"]
            + (
                ["ids: int64 [batch, categorical]: each field's table row, streamtrain hash v1 (not in the graph)"]
                if inputs.categorical
                else []
            ),
            "checked": {"max_abs_diff": diff, "atol": ATOL, "rtol": RTOL, "runtime": "onnxruntime, CPU"},
        }
    spec = {**serving_spec(info, state, fmt, out.name), **extra}
    sidecar_path(out).write_text(json.dumps(spec, indent=2) + "\n")
    return spec


def served_module(meta: dict, state: dict, weights: dict) -> Served:
    """The snapshot's model with its standardization (and label's), ready to answer raw rows."""
    cfg = meta["config"]
    inputs = model_inputs_of(meta)
    model = build_model(cfg["model"]["name"], dict(cfg["model"].get("params") or {}), inputs)
    model.load_state_dict(weights)
    target = target_standardization(meta, state) if cfg["trainer"].get("task") == "regression" else (None, None)
    return Served(
        model,
        *standardization(meta, state),
        *target,
        missing=_missing(meta),
        takes_ids=inputs.categorical > 0,
        logit_scale=logit_scale(state),
    ).eval()


def logit_scale(state: dict) -> float | None:
    """The fitted temperature's inverse (``trainer.calibration: temperature``), or None: the logits as they are."""
    fitted = state.get("calibration")
    return float(fitted["beta"]) if fitted else None


def _program(meta: dict, state: dict, weights: dict) -> torch.export.ExportedProgram:
    module = served_module(meta, state, weights)
    batch = torch.export.Dim("batch", min=1)
    example = torch.zeros(2, _width(meta))
    if not module.takes_ids:
        return torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
    ids = torch.zeros(2, model_inputs_of(meta).categorical, dtype=torch.int64)
    return torch.export.export(module, (example, ids), dynamic_shapes=({0: batch}, {0: batch}))


def _width(meta: dict) -> int:
    data = meta["config"]["data"]
    return int(data.get("num_features") or len(data.get("features") or []))


def _missing(meta: dict) -> bool:
    """Missing numbers imputed, with their marks (``data.missing: impute`` on named numeric features of any format but raw)."""
    data = meta["config"]["data"]
    named = bool(data.get("features")) and data.get("format", "json") in ("json", "csv", "arrow", "avro", "protobuf")
    return named and data.get("missing", "reject") == "impute"
