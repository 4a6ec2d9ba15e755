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

The numbers are the trainer's own float32 statistics (``RunningStandardizer.shift``,
``.scale`` and ``.std``), so either form reproduces the trainer's prediction exactly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from streamtrain.daemon.normalizer import RunningStandardizer
from streamtrain.daemon.snapshot import SnapshotInfo
from streamtrain.models.registry import build_model, resolve

__all__ = ["EXPORT_FORMATS", "export_model", "serving_spec", "sidecar_path", "standardization", "target_standardization"]

EXPORT_FORMATS = ("state_dict", "program")
SPEC_VERSION = 2  # 2: outputs.destandardize (regression trains on the standardized label)

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
    norm = RunningStandardizer(_width(meta), enabled=bool(cfg["trainer"].get("standardize", True)))
    if norm.enabled and "normalizer" in state:
        norm.load_state_dict(state["normalizer"])
    return norm.shift.clone(), norm.scale.clone()  # disabled: zeros and ones, the identity


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
        "model": {"name": name, "class": f"{cls.__module__}:{cls.__qualname__}", "params": params, "in_features": _width(meta)},
        "inputs": {
            "features": list(data.get("features") or []),
            "feature_field": data.get("feature_field"),
            "num_features": _width(meta),
            "standardize": {
                "included_in_program": fmt == "program",
                "formula": "x_std = (x - mean) * scale",
                "mean": [float(v) for v in mean],
                "scale": [float(v) for v in scale],
            },
        },
        "outputs": {
            "task": trainer["task"],
            "num_classes": trainer.get("num_classes", 0),
            "meaning": _OUTPUTS.get(trainer["task"], ""),
            "destandardize": {
                "included_in_program": fmt == "program",
                "formula": "y = output * std + mean",
                "mean": float(y_mean[0]),
                "std": float(y_std[0]),
            },
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
    if fmt == "state_dict":
        torch.save(weights, out)
    else:
        torch.export.save(_program(info.meta, state, weights), out)
    spec = serving_spec(info, state, fmt, out.name)
    sidecar_path(out).write_text(json.dumps(spec, indent=2) + "\n")
    return spec


class _Standardized(nn.Module):
    """Standardization, the model, and (regression) the output back in label units, as one module to export."""

    def __init__(
        self,
        model: nn.Module,
        mean: torch.Tensor,
        scale: torch.Tensor,
        y_mean: torch.Tensor | None = None,
        y_std: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", mean)
        self.register_buffer("scale", scale)
        self.destandardize = y_mean is not None and y_std is not None
        if self.destandardize:
            self.register_buffer("y_mean", y_mean)
            self.register_buffer("y_std", y_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model((x - self.mean) * self.scale)
        if self.destandardize:
            out = out * self.y_std + self.y_mean  # as the trainer's prequential prediction
        return out


def _program(meta: dict, state: dict, weights: dict) -> torch.export.ExportedProgram:
    cfg = meta["config"]
    model = build_model(cfg["model"]["name"], dict(cfg["model"].get("params") or {}), _width(meta))
    model.load_state_dict(weights)
    target = target_standardization(meta, state) if cfg["trainer"].get("task") == "regression" else (None, None)
    module = _Standardized(model, *standardization(meta, state), *target).eval()
    example = torch.zeros(2, _width(meta))
    batch = torch.export.Dim("batch", min=1)
    return torch.export.export(module, (example,), dynamic_shapes=({0: batch},))


def _width(meta: dict) -> int:
    data = meta["config"]["data"]
    return int(data.get("num_features") or len(data.get("features") or []))
