"""What a snapshot may hold, checked before anything touches the disk; a map over a state's tensors.

The state must come back unchanged from ``torch.load(weights_only=True)`` and the meta
from JSON; :func:`_check` refuses anything else at write time, naming where it is.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from streamtrain.daemon.errors import SnapshotError

_MAX_STEP = 10**12 - 1
# Exact types torch.load(weights_only=True) accepts as leaves; anything else would make
# a snapshot that writes fine and is refused at restart.
_LOADABLE_LEAVES = (bool, int, float, complex, str, bytes, bytearray, type(None),
                    torch.dtype, torch.device, torch.Size, torch.Tensor, torch.nn.Parameter)  # fmt: skip


def _check(state: Any, meta: Any) -> int:
    """Validate before touching the disk; return the step."""
    if not isinstance(state, dict) or not isinstance(meta, dict):
        raise SnapshotError(f"state and meta must be dicts, got {type(state).__name__} and {type(meta).__name__}")
    step = meta.get("step")
    if type(step) is not int or not 0 <= step <= _MAX_STEP:
        raise SnapshotError(f"meta['step'] must be an int in 0..{_MAX_STEP}, got {step!r}")
    problem = _json_problem(meta, "meta") or _unloadable(state, "state")
    if problem:
        raise SnapshotError(f"{problem}; snapshot not written")
    return step


def _json_problem(value: Any, where: str) -> str | None:
    """Describe the first value JSON cannot hold faithfully (non-str keys would come back as str)."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                return f"{where}: key {k!r} is {type(k).__name__}; JSON object keys must be str"
            if problem := _json_problem(v, f"{where}[{k!r}]"):
                return problem
        return None
    if isinstance(value, (list, tuple)):
        return next(filter(None, (_json_problem(v, f"{where}[{i}]") for i, v in enumerate(value))), None)
    if value is None or isinstance(value, (str, int, float)):
        return None
    return f"{where}: {type(value).__name__} is not JSON serializable"


def _unloadable(value: Any, where: str) -> str | None:
    """Describe the first value ``torch.load(weights_only=True)`` would refuse."""
    kind = type(value)
    if kind in (dict, OrderedDict):
        for k, v in value.items():
            if problem := _unloadable(k, f"{where} key {k!r}") or _unloadable(v, f"{where}[{k!r}]"):
                return problem
        return None
    if kind in (list, tuple, set):
        return next(filter(None, (_unloadable(v, f"{where}[{i}]") for i, v in enumerate(value))), None)
    if kind in _LOADABLE_LEAVES:
        return None
    return (
        f"{where}: {kind.__module__}.{kind.__qualname__} cannot be loaded with weights_only=True; "
        "convert it to a tensor or plain Python values"
    )


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        out = {k: _map_tensors(v, fn) for k, v in obj.items()}
        if isinstance(obj, OrderedDict):
            out = OrderedDict(out)
            if hasattr(obj, "_metadata"):  # module state dicts carry version info here
                out._metadata = copy.deepcopy(obj._metadata)
        return out
    if isinstance(obj, list):
        return [_map_tensors(v, fn) for v in obj]
    if isinstance(obj, tuple) and not isinstance(obj, torch.Size):
        items = [_map_tensors(v, fn) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    return obj
