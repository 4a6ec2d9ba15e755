"""The models streamtrain can train: one config dataclass and ``nn.Module`` per file.

The daemon only talks to :func:`build_model` / :func:`make_config`; a model is named
by a built-in name or a user ``"package.module:Class"`` import path.  The config classes
need no torch; the module classes (``streamtrain.models.MLP``, ...) import it when first
named.
"""

from __future__ import annotations

from streamtrain.models.configs import LinearConfig, LogisticConfig, MLPConfig, TransformerRegressorConfig
from streamtrain.models.registry import (
    MODELS,
    ModelConfigError,
    ModelSpecError,
    build_model,
    make_config,
    output_size,
    resolve,
)

__all__ = [
    "MLP",
    "MODELS",
    "Linear",
    "LinearConfig",
    "Logistic",
    "LogisticConfig",
    "MLPConfig",
    "ModelConfigError",
    "ModelSpecError",
    "TransformerRegressor",
    "TransformerRegressorConfig",
    "build_model",
    "make_config",
    "output_size",
    "resolve",
]


_MODULES = {"Linear": "linear", "Logistic": "logistic", "MLP": "mlp", "TransformerRegressor": "transformer"}


def __getattr__(name: str) -> object:
    if name in _MODULES:
        import importlib

        return getattr(importlib.import_module(f"streamtrain.models.{_MODULES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
