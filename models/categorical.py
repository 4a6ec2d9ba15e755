"""What the built-in models share for categorical inputs and missing-value marks.

A record's categorical fields arrive as rows of one shared, hashed table
(``ids``: (B, fields) int64, computed in the ingest process; the table has
``buckets`` rows whatever the number of fields).  A model looks its rows up in an
``nn.Embedding``/``nn.EmbeddingBag`` with ``sparse=True``: a step's gradient, and its
optimizer update, touch only the rows the batch holds, not the whole table.

When missing numbers are imputed, the last ``indicators`` inputs are 0/1 "was missing"
marks of the first ones.  Their first-layer weights start at zero (:func:`widen`), so a
stream that never misses a value learns exactly as it would without them.
"""

from __future__ import annotations

import torch
from torch import nn


def table(buckets: int, dim: int, std: float, sparse: bool = True) -> nn.Embedding:
    """A (B, fields) -> (B, fields, dim) lookup, normal(0, std) (zeros for std 0); sparse gradients unless told."""
    emb = nn.Embedding(buckets, dim, sparse=sparse)
    if std > 0:
        nn.init.normal_(emb.weight, 0.0, std)
    else:
        nn.init.zeros_(emb.weight)
    return emb


def bag(buckets: int, dim: int, sparse: bool = True) -> nn.EmbeddingBag:
    """A (B, fields) -> (B, dim) sum of the fields' rows, starting at zero (a linear model's weights per id)."""
    emb = nn.EmbeddingBag(buckets, dim, mode="sum", sparse=sparse)
    nn.init.zeros_(emb.weight)
    return emb


def widen(layer: nn.Linear, zero_inputs: int = 0, extra: int = 0, extra_bound: float | None = None) -> nn.Linear:
    """``layer`` with ``zero_inputs`` more input columns starting at zero, then ``extra`` more drawn uniformly.

    The original columns and bias keep their values (and the random draws that made them),
    so adding inputs that are always zero changes nothing.
    """
    if not zero_inputs and not extra:
        return layer
    out_features, n = layer.weight.shape
    wider = blank_linear(n + zero_inputs + extra, out_features, bias=layer.bias is not None)
    with torch.no_grad():
        wider.weight.zero_()
        wider.weight[:, :n] = layer.weight
        if extra:
            bound = extra_bound if extra_bound is not None else 1.0 / (n + extra) ** 0.5
            wider.weight[:, n + zero_inputs :].uniform_(-bound, bound)
        if layer.bias is not None:
            wider.bias.copy_(layer.bias)
    return wider


def blank_linear(in_features: int, out_features: int, bias: bool = True) -> nn.Linear:
    """An ``nn.Linear`` of zeros, made without drawing from the random generator (nor warning when it has no input)."""
    layer = nn.Linear(1, 1, bias=bias, device="meta").to_empty(device="cpu")  # no draw: its parameters are replaced
    layer.in_features, layer.out_features = in_features, out_features
    layer.weight = nn.Parameter(torch.zeros(out_features, in_features))
    layer.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
    return layer


class AffineWithTable(nn.Module):
    """``x W + b``, plus with categorical fields one learned weight per table row and output (summed over a record's rows).

    Linear and logistic regression are this: zeros at the start, as River's linear models
    start (a convex model needs no random start, and an untrained one predicts the mean, or
    0.5).  Its parameters are ``linear.*`` and ``table.weight``, as in every snapshot.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, categorical: int, buckets: int) -> None:
        super().__init__()
        if in_features:
            self.linear = nn.Linear(in_features, out_features, bias=bias)
        else:
            self.linear = blank_linear(0, out_features, bias)
        nn.init.zeros_(self.linear.weight)
        if self.linear.bias is not None:
            nn.init.zeros_(self.linear.bias)
        self.table = bag(buckets, out_features) if categorical else None

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        out = self.linear(x)
        if self.table is not None:
            out = out + self.table(ids)
        return out
