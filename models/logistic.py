"""Logistic (binary) and softmax (multi-class) regression.

Returns logits, never probabilities: the loss (``BCEWithLogitsLoss`` or
``CrossEntropyLoss``) applies the sigmoid or softmax itself, which is numerically
safer. Two classes give one logit, so binary labels need no one-hot encoding.
"""

from __future__ import annotations

from streamtrain.models.categorical import AffineWithTable
from streamtrain.models.configs import LogisticConfig


class Logistic(AffineWithTable):
    """(B, in_features) -> (B, 1) logit when binary, else (B, num_classes) logits."""

    def __init__(self, config: LogisticConfig) -> None:
        problems = config.validate()
        if problems:
            raise ValueError(f"invalid LogisticConfig: {'; '.join(problems)}")
        super().__init__(config.in_features, config.out_features, True, config.categorical, config.buckets)
        self.config = config
