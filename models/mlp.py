"""Multi-layer perceptron: the default non-linear model for flat feature vectors.

Each hidden block is Linear -> (LayerNorm) -> activation -> (Dropout); the last
layer is a plain Linear so the outputs stay raw (regression values or logits).  With
categorical fields, each field's row of the shared hashed table (``embedding_dim`` wide)
is concatenated to the numbers before the first layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from streamtrain.models.categorical import check, table, widen

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
}


@dataclass(frozen=True)
class MLPConfig:
    """Layer sizes and regularisation; ``in_features`` is usually filled from the stream."""

    in_features: int = 0
    hidden: tuple[int, ...] = (64,)
    out_features: int = 1
    activation: str = "relu"
    dropout: float = 0.0
    layer_norm: bool = False
    categorical: int = 0  # categorical fields (filled from data.categorical)
    buckets: int = 0  # rows of the hashed table (filled from data.hash_buckets)
    embedding_dim: int = 8  # width of a categorical field's row
    embedding_std: float = 0.05  # the rows' initial spread
    indicators: int = 0  # the last inputs that are 0/1 "was missing" marks (filled when data.missing is impute)

    def validate(self) -> list[str]:
        """Every problem with this config, as ``field: must be ..., got X``."""
        problems = check(self.categorical, self.buckets, self.embedding_dim, self.indicators, self.in_features)
        if not isinstance(self.in_features, int) or self.in_features < 0 or (self.in_features == 0 and not self.categorical):
            problems.append(f"in_features: must be > 0, got {self.in_features!r}")
        if not isinstance(self.hidden, (tuple, list)) or not all(isinstance(size, int) and size > 0 for size in self.hidden):
            problems.append(f"hidden: every size must be > 0, got {self.hidden!r}")
        if not isinstance(self.out_features, int) or self.out_features <= 0:
            problems.append(f"out_features: must be > 0, got {self.out_features!r}")
        if self.activation not in ACTIVATIONS:
            known = ", ".join(ACTIVATIONS)
            problems.append(f"activation: must be one of {known}, got {self.activation!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout: must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.layer_norm, bool):
            problems.append(f"layer_norm: must be a bool, got {self.layer_norm!r}")
        return problems


class MLP(nn.Module):
    """(B, in_features) -> (B, out_features) through the hidden blocks."""

    def __init__(self, config: MLPConfig) -> None:
        super().__init__()
        problems = config.validate()
        if problems:
            raise ValueError(f"invalid MLPConfig: {'; '.join(problems)}")
        self.config = config
        layers: list[nn.Module] = []
        numbers = config.in_features - config.indicators
        embedded = config.categorical * config.embedding_dim
        width = numbers
        for k, size in enumerate(config.hidden):
            first = nn.Linear(width, size)
            # the marks start at zero; the rows get weights of their own (the numbers' draws as without them)
            layers.append(widen(first, config.indicators, embedded) if k == 0 else first)
            if config.layer_norm:
                layers.append(nn.LayerNorm(size))
            layers.append(ACTIVATIONS[config.activation]())
            if config.dropout > 0:
                layers.append(nn.Dropout(config.dropout))
            width = size
        if not config.hidden:
            width += config.indicators + embedded
        layers.append(nn.Linear(width, config.out_features))
        self.net = nn.Sequential(*layers)
        self.table = table(config.buckets, config.embedding_dim, config.embedding_std) if config.categorical else None

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.table is not None:
            x = torch.cat([x, self.table(ids).flatten(1)], dim=1)
        return self.net(x)
