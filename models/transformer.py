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

import torch
from torch import nn

from streamtrain.models.categorical import table, widen
from streamtrain.models.configs import TransformerRegressorConfig


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
