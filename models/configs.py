"""The built-in models' config dataclasses: ``model.params`` is checked against these.

Apart from the modules so that checking a config (``streamtrain check-config``, the
launcher of several ranks) needs no torch; each module file builds its ``nn.Module``
from its config here.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ACTIVATION_NAMES", "FMConfig", "LinearConfig", "LogisticConfig", "MLPConfig", "TransformerRegressorConfig", "check"]

ACTIVATION_NAMES = ("relu", "gelu", "tanh", "silu")  # models/mlp.py's ACTIVATIONS


def check(categorical: int, buckets: int, embedding_dim: int | None = None, indicators: int = 0, in_features: int = 0) -> list[str]:
    problems = []
    if not isinstance(categorical, int) or categorical < 0:
        problems.append(f"categorical: must be >= 0 (the number of categorical fields), got {categorical!r}")
    elif categorical and (not isinstance(buckets, int) or buckets <= 0):
        problems.append(f"buckets: must be > 0 with categorical fields (data.hash_buckets), got {buckets!r}")
    if embedding_dim is not None and (not isinstance(embedding_dim, int) or embedding_dim <= 0):
        problems.append(f"embedding_dim: must be > 0, got {embedding_dim!r}")
    if not isinstance(indicators, int) or indicators < 0 or (isinstance(in_features, int) and 2 * indicators > in_features):
        problems.append(f"indicators: must be >= 0 and at most half of in_features, got {indicators!r}")
    return problems


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


@dataclass(frozen=True)
class MLPConfig:
    """Layer sizes and regularisation; ``in_features`` is usually filled from the stream."""

    in_features: int = 0
    hidden: tuple[int, ...] = (64,)
    out_features: int = 1
    activation: str = "relu"
    dropout: float = 0.0
    layer_norm: bool = False
    categorical: int = 0  # categorical fields (filled from data.categorical)
    buckets: int = 0  # rows of the hashed table (filled from data.hash_buckets)
    embedding_dim: int = 8  # width of a categorical field's row
    embedding_std: float = 0.05  # the rows' initial spread
    indicators: int = 0  # the last inputs that are 0/1 "was missing" marks (filled when data.missing is impute)

    def validate(self) -> list[str]:
        """Every problem with this config, as ``field: must be ..., got X``."""
        problems = check(self.categorical, self.buckets, self.embedding_dim, self.indicators, self.in_features)
        if not isinstance(self.in_features, int) or self.in_features < 0 or (self.in_features == 0 and not self.categorical):
            problems.append(f"in_features: must be > 0, got {self.in_features!r}")
        if not isinstance(self.hidden, (tuple, list)) or not all(isinstance(size, int) and size > 0 for size in self.hidden):
            problems.append(f"hidden: every size must be > 0, got {self.hidden!r}")
        if not isinstance(self.out_features, int) or self.out_features <= 0:
            problems.append(f"out_features: must be > 0, got {self.out_features!r}")
        if self.activation not in ACTIVATION_NAMES:
            known = ", ".join(ACTIVATION_NAMES)
            problems.append(f"activation: must be one of {known}, got {self.activation!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout: must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.layer_norm, bool):
            problems.append(f"layer_norm: must be a bool, got {self.layer_norm!r}")
        return problems


@dataclass(frozen=True)
class FMConfig:
    in_features: int = 0  # numbers (and their "was missing" marks), filled from the stream
    out_features: int = 1
    categorical: int = 0  # categorical fields (filled from data.categorical)
    buckets: int = 0  # rows of the hashed table (filled from data.hash_buckets)
    embedding_dim: int = 16  # k, the factors' width
    embedding_std: float = 0.01  # the factors' initial spread
    indicators: int = 0  # the last inputs that are 0/1 "was missing" marks (filled when data.missing is impute)
    sparse: bool = True  # sparse gradients for the tables: a step updates the rows its batch holds (False: every row)

    def validate(self) -> list[str]:
        problems = check(self.categorical, self.buckets, self.embedding_dim, self.indicators, self.in_features)
        if not isinstance(self.in_features, int) or self.in_features < 0 or (self.in_features == 0 and not self.categorical):
            problems.append(f"in_features: must be > 0 (or categorical fields given), got {self.in_features!r}")
        if not isinstance(self.out_features, int) or self.out_features <= 0:
            problems.append(f"out_features: must be > 0, got {self.out_features!r}")
        if not isinstance(self.embedding_std, (int, float)) or self.embedding_std < 0:
            problems.append(f"embedding_std: must be >= 0, got {self.embedding_std!r}")
        return problems


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
