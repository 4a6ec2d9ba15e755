"""Transformer-encoder regressor for fixed-length sequences sent as flat vectors.

A record carries ``seq_len`` steps of ``d_in`` features flattened to one vector of
``seq_len * d_in`` floats, so the stream stays a plain feature stream. The model
unflattens it, projects each step to ``d_model``, adds a fixed sinusoidal position
encoding, runs a ``TransformerEncoder`` and maps every step's output, flattened,
to ``out_features`` raw outputs. The position encoding is recomputed from the
config, so it is kept out of the ``state_dict``.

Categorical fields are tokens of their own: each field's row of the shared hashed
table (``embedding_dim`` wide) is projected to ``d_model`` and gets a learned field
embedding, and they are encoded with the steps.  With missing numbers imputed, each
step's "was missing" marks join its values in the input projection (from zero).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from streamtrain.models.categorical import check, table, widen


@dataclass(frozen=True)
class TransformerRegressorConfig:
    """Sequence shape and encoder size.

    Give ``seq_len`` or ``in_features`` (usually filled from the stream); the other
    is derived: ``seq_len = in_features // d_in``. When both are given they must
    agree: ``in_features == seq_len * d_in``.
    """

    seq_len: int = 0
    d_in: int = 1
    d_model: int = 64
    nhead: int = 4
    num_layers: int = 2
    dim_feedforward: int = 128
    dropout: float = 0.1
    out_features: int = 1
    in_features: int = 0
    categorical: int = 0  # categorical fields (filled from data.categorical): a token each
    buckets: int = 0  # rows of the hashed table (filled from data.hash_buckets)
    embedding_dim: int = 16  # width of a field's row, projected to d_model
    embedding_std: float = 0.05
    indicators: int = 0  # the last inputs that are 0/1 "was missing" marks of the steps' values (0 or seq_len * d_in)

    def __post_init__(self) -> None:
        if not all(isinstance(v, int) for v in (self.seq_len, self.d_in, self.in_features, self.indicators)):
            return  # validate() reports the wrong type
        numbers = self.in_features - self.indicators
        if self.seq_len == 0 and numbers > 0 and self.d_in > 0:
            object.__setattr__(self, "seq_len", numbers // self.d_in)
        elif self.in_features == 0 and self.seq_len > 0 and self.d_in > 0:
            object.__setattr__(self, "in_features", self.seq_len * self.d_in + self.indicators)

    def validate(self) -> list[str]:
        """Every problem with this config, as ``field: must be ..., got X``."""
        problems = check(self.categorical, self.buckets, self.embedding_dim, self.indicators, self.in_features)
        if not problems and self.indicators and self.indicators != self.in_features - self.indicators:
            problems.append(f"indicators: must mark every step value ({self.in_features - self.indicators}) or none, got {self.indicators}")
        for name in ("d_in", "d_model", "nhead", "num_layers", "dim_feedforward", "out_features"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                problems.append(f"{name}: must be > 0, got {value!r}")
        if not isinstance(self.seq_len, int) or self.seq_len < 0 or (self.seq_len == 0 and not self.categorical):
            problems.append(f"seq_len: must be > 0 (or set in_features to derive it), got {self.seq_len!r}")
        if not isinstance(self.in_features, int) or self.in_features < 0:
            problems.append(f"in_features: must be >= 0, got {self.in_features!r}")
        if not problems:
            numbers = self.in_features - self.indicators
            if numbers % self.d_in != 0:
                problems.append(f"in_features: must be a multiple of d_in={self.d_in}, got {self.in_features}")
            elif numbers != self.seq_len * self.d_in:
                problems.append(
                    f"in_features: must equal seq_len * d_in = {self.seq_len} * {self.d_in}"
                    f" = {self.seq_len * self.d_in}, got {self.in_features}"
                )
            if self.d_model % self.nhead != 0:
                problems.append(f"nhead: must divide d_model={self.d_model}, got {self.nhead}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout: must be in [0, 1), got {self.dropout!r}")
        return problems


def sinusoidal_encoding(seq_len: int, d_model: int) -> torch.Tensor:
    """The fixed (seq_len, d_model) position encoding of "Attention Is All You Need"."""
    position = torch.arange(seq_len, dtype=torch.float32).unsqueeze(1)
    even = torch.arange(0, d_model, 2, dtype=torch.float32)
    div_term = torch.exp(even * (-math.log(10000.0) / d_model))
    encoding = torch.zeros(seq_len, d_model)
    encoding[:, 0::2] = torch.sin(position * div_term)
    encoding[:, 1::2] = torch.cos(position * div_term[: d_model // 2])
    return encoding


class TransformerRegressor(nn.Module):
    """(B, seq_len * d_in) -> (B, out_features) through a Transformer encoder."""

    def __init__(self, config: TransformerRegressorConfig) -> None:
        super().__init__()
        problems = config.validate()
        if problems:
            raise ValueError(f"invalid TransformerRegressorConfig: {'; '.join(problems)}")
        self.config = config
        marks = config.d_in if config.indicators else 0
        self.input_proj = widen(nn.Linear(config.d_in, config.d_model), marks)
        self.register_buffer(
            "pos_encoding",
            sinusoidal_encoding(config.seq_len, config.d_model).unsqueeze(0),
            persistent=False,
        )
        layer = nn.TransformerEncoderLayer(
            d_model=config.d_model,
            nhead=config.nhead,
            dim_feedforward=config.dim_feedforward,
            dropout=config.dropout,
            batch_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=config.num_layers, enable_nested_tensor=False)
        tokens = config.seq_len + config.categorical
        self.head = nn.Linear(tokens * config.d_model, config.out_features)
        if config.categorical:
            self.table = table(config.buckets, config.embedding_dim, config.embedding_std)
            self.field_proj = nn.Linear(config.embedding_dim, config.d_model)
            self.field_embedding = nn.Parameter(torch.randn(config.categorical, config.d_model) * 0.02)
        else:
            self.table = None

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        batch, c = x.shape[0], self.config
        steps = x[:, : c.seq_len * c.d_in].reshape(batch, c.seq_len, c.d_in)
        if c.indicators:
            steps = torch.cat([steps, x[:, c.seq_len * c.d_in :].reshape(batch, c.seq_len, c.d_in)], dim=2)
        h = self.input_proj(steps) + self.pos_encoding
        if self.table is not None:
            h = torch.cat([h, self.field_proj(self.table(ids)) + self.field_embedding], dim=1)
        h = self.encoder(h)
        return self.head(h.reshape(batch, -1))
