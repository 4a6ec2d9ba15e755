"""A ledger model for the fault tests: its state counts what it was trained on.

Records carry ``(partition, sequence, f)`` as raw float32 features (or in json, csv, arrow:
``a, b, c``; with categorical fields, the sum of their table rows per partition goes to
``idsum``).  Each training
forward adds, per partition, the number of records and the sum of their sequence
numbers to buffers that live in the model's state -- so they are restored from
snapshots exactly like weights.  After the last restart has drained the topic,
exactly-once holds if and only if the ledger equals what was produced.

Fault knobs (all off by default):
- ``ballast_mb``: an unused buffer that makes snapshots large, so writes are slow
  enough to be interrupted by ``kill -9``;
- ``slow_ms``: a sleep per training step (a slow trainer), only while ``slow_file``
  exists if that is set (a stall that ends);
- ``poison_rate`` / ``poison_grad_rate``: chance a step's loss / gradient is NaN/Inf,
  drawn from an RNG outside the saved state so a replay does not repeat the pattern;
- ``poison_file``: while this file exists every step's loss is NaN (a divergence);
- ``oracle``: the prediction is ``seq % 2``, whatever the weights (they get zero gradients),
  so the prequential error of every record is known from the record alone.
A poisoned step's records go to ``skipped`` instead of ``count``, so
``count + skipped == produced`` stays exact.

Under several ranks (torch.distributed initialized) every rank's forward sums what each
rank saw, and whether any rank poisoned the step, over the ranks: the step is skipped on
all of them if it is on one, and the replicated ledger is the ledger of the union.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LedgerConfig:
    in_features: int = 3
    partitions: int = 4
    ballast_mb: float = 0.0
    slow_ms: float = 0.0
    slow_file: str = ""
    poison_rate: float = 0.0
    poison_grad_rate: float = 0.0
    poison_file: str = ""
    oracle: bool = False


class Ledger(nn.Module):
    Config = LedgerConfig

    def __init__(self, config: LedgerConfig) -> None:
        super().__init__()
        self.config = config
        self.lin = nn.Linear(1, 1)
        p = config.partitions
        for name in ("count", "seqsum", "skipped", "skipped_seqsum", "idsum"):
            self.register_buffer(name, torch.zeros(p, dtype=torch.float64))
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.float64))
        self.register_buffer("ballast", torch.zeros(int(config.ballast_mb * 2**20 / 4)))
        self._rng = random.Random()  # deliberately not part of the state

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        out = self.lin(x[:, 2:3])
        if self.config.oracle:
            out = out * 0 + torch.remainder(x[:, 1:2], 2)
        if not self.training:
            return out
        cfg = self.config
        if cfg.slow_ms and (not cfg.slow_file or os.path.exists(cfg.slow_file)):
            time.sleep(cfg.slow_ms / 1000)
        poison = bool(cfg.poison_file and os.path.exists(cfg.poison_file)) or self._rng.random() < cfg.poison_rate
        poison_grad = not poison and self._rng.random() < cfg.poison_grad_rate
        if not len(x):  # a rank with nothing this turn: no loss or gradient of its own to poison (it would count a skip
            poison = poison_grad = False  # the step, all-reduced from finite parts, does not make)
        part = x[:, 0].long()
        seq = x[:, 1].double()
        with torch.no_grad():
            count = torch.zeros_like(self.count).index_add_(0, part, torch.ones_like(seq))
            seqsum = torch.zeros_like(self.seqsum).index_add_(0, part, seq)
            skip = poison or poison_grad
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                vec = torch.cat([count, seqsum, torch.tensor([float(poison or poison_grad)], dtype=torch.float64)])
                torch.distributed.all_reduce(vec)
                p = self.config.partitions
                count, seqsum, skip = vec[:p], vec[p : 2 * p], bool(vec[2 * p] > 0)
            if skip:
                self.skipped.add_(count)
                self.skipped_seqsum.add_(seqsum)
                self.skipped_steps += 1
            else:
                self.count.add_(count)
                self.seqsum.add_(seqsum)
                if ids is not None:  # the table rows arrive with their records: their sum per partition
                    self.idsum.index_add_(0, part, ids.sum(1).double())
        if poison:
            return out * math.nan
        if poison_grad:
            out.register_hook(lambda g: g * math.inf)
        return out
