"""Factorization machine (Rendle 2010): the click-through-rate standard for ids, which pay off through their interactions.

    y = b + w . x + sum_f w[id_f] + sum_{i < j} <v_i, v_j> z_i z_j

over every input ``i``: each numeric feature (``z_i`` its standardized value, ``v_i`` a
learned vector of its own) and each categorical field (``z_i = 1``, ``v_i`` its id's row
of the shared hashed table).  The pairwise term is computed in O(inputs x k) as
``0.5 * sum_k ((sum_i v_ik z_i)^2 - sum_i v_ik^2 z_i^2)``.  The first-order part is
exactly the linear model's (one weight per id and per number), so an FM starts where the
linear model is and adds what two ids do together: a user and an item, a device and an
hour.  Every table is sparse: a step updates the rows its batch holds.  More than one
output (``out_features``, multiclass) maps the k interaction sums through a linear layer.
"""

from __future__ import annotations

import torch
from torch import nn

from streamtrain.models.categorical import bag, blank_linear, table
from streamtrain.models.configs import FMConfig


class FM(nn.Module):
    """(B, in_features) numbers and (B, categorical) table rows -> (B, out_features)."""

    def __init__(self, config: FMConfig) -> None:
        super().__init__()
        problems = config.validate()
        if problems:
            raise ValueError(f"invalid FMConfig: {'; '.join(problems)}")
        self.config = config
        k = config.embedding_dim
        self.linear = blank_linear(config.in_features, config.out_features)  # first order of the numbers, from zero
        self.weights = bag(config.buckets, config.out_features, config.sparse) if config.categorical else None  # first order of the ids
        self.factors = table(config.buckets, k, config.embedding_std, config.sparse) if config.categorical else None
        numbers = torch.randn(config.in_features, k) * config.embedding_std
        if config.indicators:  # the "was missing" marks start without interactions
            numbers[-config.indicators :] = 0.0
        self.number_factors = nn.Parameter(numbers)
        self.head = nn.Linear(k, config.out_features) if config.out_features > 1 else None

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        out = self.linear(x)
        terms = x.unsqueeze(2) * self.number_factors  # (B, n, k): v_i z_i of the numbers
        if self.factors is not None:
            out = out + self.weights(ids)
            terms = torch.cat([terms, self.factors(ids)], dim=1)  # and of the ids (z = 1)
        pairs = 0.5 * (terms.sum(1).square() - terms.square().sum(1))  # (B, k)
        return out + (self.head(pairs) if self.head is not None else pairs.sum(1, keepdim=True))
