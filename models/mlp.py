"""Multi-layer perceptron: the default non-linear model for flat feature vectors.

Each hidden block is Linear -> (LayerNorm) -> activation -> (Dropout); the last
layer is a plain Linear so the outputs stay raw (regression values or logits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

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

    def validate(self) -> list[str]:
        """Every problem with this config, as ``field: must be ..., got X``."""
        problems = []
        if not isinstance(self.in_features, int) or self.in_features <= 0:
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
        width = config.in_features
        for size in config.hidden:
            layers.append(nn.Linear(width, size))
            if config.layer_norm:
                layers.append(nn.LayerNorm(size))
            layers.append(ACTIVATIONS[config.activation]())
            if config.dropout > 0:
                layers.append(nn.Dropout(config.dropout))
            width = size
        layers.append(nn.Linear(width, config.out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
