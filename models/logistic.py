"""Logistic (binary) and softmax (multi-class) regression.

Returns logits, never probabilities: the loss (``BCEWithLogitsLoss`` or
``CrossEntropyLoss``) applies the sigmoid or softmax itself, which is numerically
safer. Two classes give one logit, so binary labels need no one-hot encoding.
"""

from __future__ import annotations

from dataclasses import dataclass

from streamtrain.models.categorical import AffineWithTable, check


@dataclass(frozen=True)
class LogisticConfig:
    """Number of inputs and classes; ``in_features`` is usually filled from the stream."""

    in_features: int = 0
    num_classes: int = 2
    categorical: int = 0  # categorical fields (filled from data.categorical): one learned weight per table row and logit
    buckets: int = 0  # rows of the hashed table (filled from data.hash_buckets)

    @property
    def out_features(self) -> int:
        """One logit for a binary problem, else one logit per class."""
        return 1 if self.num_classes == 2 else self.num_classes

    def validate(self) -> list[str]:
        """Every problem with this config, as ``field: must be ..., got X``."""
        problems = check(self.categorical, self.buckets)
        if not isinstance(self.in_features, int) or self.in_features < 0 or (self.in_features == 0 and not self.categorical):
            problems.append(f"in_features: must be > 0, got {self.in_features!r}")
        if not isinstance(self.num_classes, int) or self.num_classes < 2:
            problems.append(f"num_classes: must be >= 2, got {self.num_classes!r}")
        return problems


class Logistic(AffineWithTable):
    """(B, in_features) -> (B, 1) logit when binary, else (B, num_classes) logits."""

    def __init__(self, config: LogisticConfig) -> None:
        problems = config.validate()
        if problems:
            raise ValueError(f"invalid LogisticConfig: {'; '.join(problems)}")
        super().__init__(config.in_features, config.out_features, True, config.categorical, config.buckets)
        self.config = config
