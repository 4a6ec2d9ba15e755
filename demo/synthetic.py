"""A learnable synthetic stream: y = a nonlinear function of x, plus noise.

Features are shifted and scaled unevenly so standardization matters.  Seeded: the same
``seed`` gives the same target function and the same samples.
"""

from __future__ import annotations

import numpy as np


class SyntheticStream:
    def __init__(self, width: int = 16, seed: int = 0, noise: float = 0.05) -> None:
        rng = np.random.default_rng(seed)
        self.width = width
        self.w = rng.normal(size=width) / np.sqrt(width)
        self.scale = rng.uniform(0.5, 5.0, size=width)
        self.shift = rng.normal(scale=3.0, size=width)
        self.noise = noise
        self.rng = np.random.default_rng(seed + 1)

    def batch(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        z = self.rng.normal(size=(n, self.width))
        y = z @ self.w + 0.5 * np.sin(2 * z[:, 0]) * z[:, 1] + self.noise * self.rng.normal(size=n)
        x = z * self.scale + self.shift
        return x.astype(np.float32), y.astype(np.float32)
