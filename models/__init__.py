"""The models streamtrain can train: one config dataclass and ``nn.Module`` per file.

The daemon only talks to :func:`build_model` / :func:`make_config`; a model is named
by a built-in name or a user ``"package.module:Class"`` import path.
"""

from __future__ import annotations

from streamtrain.models.linear import Linear, LinearConfig
from streamtrain.models.logistic import Logistic, LogisticConfig
from streamtrain.models.mlp import MLP, MLPConfig
from streamtrain.models.registry import (
    MODELS,
    ModelConfigError,
    ModelSpecError,
    build_model,
    make_config,
    output_size,
    resolve,
)
from streamtrain.models.transformer import TransformerRegressor, TransformerRegressorConfig

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
