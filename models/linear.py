"""Linear regression: the simplest online learner and the baseline to beat.

A single affine layer from the flat feature vector to ``out_features`` raw outputs, plus,
with categorical fields, one learned weight per row of the hashed table for each output
(Vowpal Wabbit's model: the rows of a record's ids are summed).
"""

from __future__ import annotations

from streamtrain.models.categorical import AffineWithTable
from streamtrain.models.configs import LinearConfig


class Linear(AffineWithTable):
    """(B, in_features) -> (B, out_features) by one affine map."""

    def __init__(self, config: LinearConfig) -> None:
        problems = config.validate()
        if problems:
            raise ValueError(f"invalid LinearConfig: {'; '.join(problems)}")
        super().__init__(config.in_features, config.out_features, config.bias, config.categorical, config.buckets)
        self.config = config
