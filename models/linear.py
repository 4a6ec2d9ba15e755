"""Linear regression: the simplest online learner and the baseline to beat.

A single affine layer from the flat feature vector to ``out_features`` raw outputs, plus,
with categorical fields, one learned weight per row of the hashed table for each output
(Vowpal Wabbit's model: the rows of a record's ids are summed).
"""

from __future__ import annotations

from dataclasses import dataclass

from streamtrain.models.categorical import AffineWithTable, check


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


class Linear(AffineWithTable):
    """(B, in_features) -> (B, out_features) by one affine map."""

    def __init__(self, config: LinearConfig) -> None:
        problems = config.validate()
        if problems:
            raise ValueError(f"invalid LinearConfig: {'; '.join(problems)}")
        super().__init__(config.in_features, config.out_features, config.bias, config.categorical, config.buckets)
        self.config = config
