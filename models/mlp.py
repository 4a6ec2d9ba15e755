"""Multi-layer perceptron: the default non-linear model for flat feature vectors.

Each hidden block is Linear -> (LayerNorm) -> activation -> (Dropout); the last
layer is a plain Linear so the outputs stay raw (regression values or logits).  With
categorical fields, each field's row of the shared hashed table (``embedding_dim`` wide)
is concatenated to the numbers before the first layer.
"""

from __future__ import annotations

import torch
from torch import nn

from streamtrain.models.categorical import table, widen
from streamtrain.models.configs import MLPConfig

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
}


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
