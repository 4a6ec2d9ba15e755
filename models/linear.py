"""Linear regression: the simplest online learner and the baseline to beat.

A single affine layer from the flat feature vector to ``out_features`` raw outputs, plus,
with categorical fields, one learned weight per row of the hashed table for each output
(Vowpal Wabbit's model: the rows of a record's ids are summed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from streamtrain.models.categorical import bag, blank_linear, check


@dataclass(frozen=True)
class LinearConfig:
    """Shape of a linear model; ``in_features`` is usually filled from the stream."""

    in_features: int = 0
    out_features: int = 1
    bias: bool = True
    categorical: int = 0  # categorical fields (filled from data.categorical)
    buckets: int = 0  # rows of the hashed table (filled from data.hash_buckets)

    def validate(self) -> list[str]:
        """Every problem with this config, as ``field: must be ..., got X``."""
        problems = check(self.categorical, self.buckets)
        if not isinstance(self.in_features, int) or self.in_features < 0 or (self.in_features == 0 and not self.categorical):
            problems.append(f"in_features: must be > 0, got {self.in_features!r}")
        if not isinstance(self.out_features, int) or self.out_features <= 0:
            problems.append(f"out_features: must be > 0, got {self.out_features!r}")
        if not isinstance(self.bias, bool):
            problems.append(f"bias: must be a bool, got {self.bias!r}")
        return problems


class Linear(nn.Module):
    """(B, in_features) -> (B, out_features) by one affine map."""

    def __init__(self, config: LinearConfig) -> None:
        super().__init__()
        problems = config.validate()
        if problems:
            raise ValueError(f"invalid LinearConfig: {'; '.join(problems)}")
        self.config = config
        self.linear = (
            nn.Linear(config.in_features, config.out_features, bias=config.bias)
            if config.in_features
            else blank_linear(0, config.out_features, config.bias)
        )
        # zeros, as River's linear models start: a convex model needs no random start, and an
        # untrained one then predicts the mean (regression) or 0.5 (classification)
        nn.init.zeros_(self.linear.weight)
        if self.linear.bias is not None:
            nn.init.zeros_(self.linear.bias)
        self.table = bag(config.buckets, config.out_features) if config.categorical else None

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        out = self.linear(x)
        if self.table is not None:
            out = out + self.table(ids)
        return out
