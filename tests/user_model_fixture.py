"""User models for the registry tests, imported as ``tests.user_model_fixture:Class``.

They stand in for code a user ships in their own package: one with a ``Config``
dataclass, one taking keyword arguments, and one that is not an ``nn.Module``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class TinyNetConfig:
    in_features: int = 0
    width: int = 4
    out_features: int = 1

    def validate(self) -> list[str]:
        if self.width <= 0:
            return [f"width: must be > 0, got {self.width}"]
        return []


class TinyNet(nn.Module):
    """A user model with a ``Config`` dataclass: built as ``TinyNet(config)``."""

    Config = TinyNetConfig

    def __init__(self, config: TinyNetConfig) -> None:
        super().__init__()
        self.config = config
        self.net = nn.Sequential(
            nn.Linear(config.in_features, config.width),
            nn.ReLU(),
            nn.Linear(config.width, config.out_features),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class KwargsNet(nn.Module):
    """A user model without ``Config``: built with keyword arguments."""

    def __init__(self, in_features: int, out_features: int = 1) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class NotAModule:
    """Has the right name shape but is not an ``nn.Module``."""
