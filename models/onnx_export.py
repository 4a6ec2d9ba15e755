"""The ONNX form of an exported model (``publish.onnx``, ``snapshots export --format onnx``), checked before it is kept.

What is exported is what the ``torch.export`` program holds -- standardization (with a
missing number imputed and its "was missing" mark), the model, for regression the output
in the label's units, a fitted temperature -- through torch's dynamo exporter with a
dynamic batch: raw features ``x`` (float32, ``NaN`` where missing) and, for a model with
categorical fields, the table rows ``ids`` (int64) in, the model's output out.  The
categorical *hashing* stays outside the graph: ``ids`` are the rows of
``streamtrain hash v1`` (``streams/features/hashing.py``), which ``streamtrain serve`` and
the ingest process compute; a client of the ONNX file alone must hash the same way.

Every file is run by onnxruntime on a probe batch around the training data's mean (with
a missing number where the model imputes, and random table rows) against the torch
module on the same rows; a largest difference over ``atol + rtol * |torch|`` refuses it
(:class:`OnnxMismatch`): a version is then published without ONNX, and says why.
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["ATOL", "RTOL", "OnnxMismatch", "check", "export_onnx", "probe_inputs"]

ATOL, RTOL = 1e-4, 1e-4
PROBE_ROWS = 64


class OnnxMismatch(Exception):
    """onnxruntime's outputs on the probe batch differ from torch's beyond the tolerance."""


def available() -> str | None:
    """Why ONNX cannot be written here (the ``onnx`` extra missing), or None."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        return f"{exc.name or exc} is not installed: pip install 'streamtrain[onnx]'"
    return None


def probe_inputs(module: torch.nn.Module, width: int, fields: int, buckets: int) -> tuple[torch.Tensor, ...]:
    """Rows around the training data's mean (the module's standardization), a missing number, random table rows."""
    g = torch.Generator().manual_seed(0)
    mean, scale = module.mean, module.scale
    spread = torch.where(scale > 0, 1.0 / scale.clamp_min(1e-30), torch.ones_like(scale))
    x = mean + torch.randn(PROBE_ROWS, width, generator=g) * spread
    if module.missing and width:
        x[0, 0] = float("nan")
    if not fields:
        return (x,)
    return x, torch.randint(0, max(1, buckets), (PROBE_ROWS, fields), generator=g)


def export_onnx(module: torch.nn.Module, out: Path, width: int, fields: int, buckets: int) -> float:
    """Write ``module`` (a :class:`~streamtrain.models.served.Served`) as ONNX to ``out`` and check it; its largest difference."""
    module = module.eval()
    args = probe_inputs(module, width, fields, buckets)
    batch = torch.export.Dim("batch", min=1)
    shapes = tuple({0: batch} for _ in args)
    names = ["x", "ids"][: len(args)]
    program = torch.onnx.export(module, args[:1] if not fields else args, dynamo=True, dynamic_shapes=shapes, input_names=names)
    program.save(str(out))
    return check(module, out, args)


def check(module: torch.nn.Module, path: Path, args: tuple[torch.Tensor, ...]) -> float:
    """onnxruntime against torch on ``args``; the largest difference, or :class:`OnnxMismatch`."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)}
    got = torch.from_numpy(session.run(None, feed)[0])
    with torch.no_grad():
        want = module(*args)
    if got.shape != want.shape:
        raise OnnxMismatch(f"onnxruntime gives outputs of shape {tuple(got.shape)}, torch {tuple(want.shape)}")
    diff = (got - want).abs()
    bound = ATOL + RTOL * want.abs()
    if not torch.isfinite(got).all() or (diff > bound).any():
        worst = float(diff.max()) if torch.isfinite(diff).all() else float("nan")
        raise OnnxMismatch(f"onnxruntime differs from torch by up to {worst:.3g} on the probe batch (allowed {ATOL} + {RTOL} x |output|)")
    return float(diff.max()) if diff.numel() else 0.0
