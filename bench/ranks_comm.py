"""Run under ``torch.distributed.run`` by ``bench.ranks --comm``: what the collectives of one step cost, by model.

``python -m torch.distributed.run --nproc-per-node 2 -m bench.ranks_comm OUT.json``: every rank
builds the daemon's learner for each model of :data:`CASES`, steps ``--steps`` batches of its
own (random rows; the categorical cases with ids drawn from ``--ids`` values per field) as
the daemon's ranked loop does (``control`` then ``Learner.step``), and times every
collective and counts its bytes.  Rank 0 writes per model: trained parameters, the step's
wall time (median), the part of it spent in collectives, and the bytes each rank sent into
them per step: all-reduced (the turn's control vector, the dense gradients, the prequential
sums) and all-gathered (a categorical table's rows the batch touched, and their ids).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from streamtrain.config.schema import Config, config_from_dict
from streamtrain.daemon.ranks import Collectives, World, control
from streamtrain.daemon.step import Learner
from streamtrain.streams.ring import Batch

WIDTH = 8
# name -> (model section, data section extras, batch rows per rank); "-ids": 4 categorical fields, 2^20 rows x 16 each
CASES: dict[str, tuple[dict[str, Any], dict[str, Any], int]] = {
    "linear": ({"name": "linear"}, {}, 256),
    "mlp-64": ({"name": "mlp", "params": {"hidden": [64]}}, {}, 256),
    "mlp-1024x2": ({"name": "mlp", "params": {"hidden": [1024, 1024]}}, {}, 256),
    "transformer": (
        {
            "name": "transformer",
            "params": {"seq_len": 8, "d_in": 1, "d_model": 32, "nhead": 4, "num_layers": 2, "dim_feedforward": 64},
        },
        {},
        64,
    ),
    "fm-ids": (
        {"name": "fm", "params": {"embedding_dim": 16}},
        {"categorical": ["u", "i", "m", "d"], "hash_buckets": 2**20},
        256,
    ),
    "mlp-ids": (
        {"name": "mlp", "params": {"hidden": [64], "embedding_dim": 16}},
        {"categorical": ["u", "i", "m", "d"], "hash_buckets": 2**20},
        256,
    ),
}


def case_config(model: dict[str, Any], data: dict[str, Any]) -> Config:
    if data.get("categorical"):
        data = {"format": "json", "features": [f"x{i}" for i in range(WIDTH)], **data}
    else:
        data = {"format": "raw", "num_features": WIDTH}
    return config_from_dict(
        {
            "kafka": {"topics": ["t"]},
            "data": data,
            "model": model,
            "snapshot": {"dir": "/nonexistent"},
            "trainer": {"task": "regression", "num_threads": 1, "lr": 1e-3},
        }
    )


class Timed:
    """Collectives that time themselves and count what this rank puts into them."""

    def __init__(self, coll: Collectives) -> None:
        self.coll, self.seconds, self.reduced, self.gathered = coll, 0.0, 0, 0
        self.reduces = self.gathers = 0  # calls: each pays the network's latency
        self.world = coll.world

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        self.reduced += t.numel() * t.element_size()
        self.reduces += 1
        return self._timed(self.coll.all_reduce, t)

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        self.gathered += t.numel() * t.element_size() + 8  # its size first, then its part
        self.gathers += 2
        return self._timed(self.coll.all_gather, t)

    def gather(self, obj: Any) -> list[Any]:
        return self._timed(self.coll.gather, obj)

    def broadcast(self, obj: Any) -> Any:
        return self._timed(self.coll.broadcast, obj)

    def _timed(self, fn, arg):
        t0 = time.perf_counter()
        try:
            return fn(arg)
        finally:
            self.seconds += time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--ids", type=int, default=100_000, help="distinct ids per categorical field the batches draw from")
    ap.add_argument("--cases", default=",".join(CASES))
    args = ap.parse_args(argv)
    world = World.from_env()
    coll: Collectives | None = None
    results = []
    g = torch.Generator().manual_seed(world.rank)
    for name in args.cases.split(","):
        model, data, rows = CASES[name]
        learner = Learner(case_config(model, data), world)
        coll = coll or Collectives(world, learner.device, 600)
        timed = Timed(coll)
        fields = len(data.get("categorical", ()))
        walls, comms, reduced, gathered, calls = [], [], [], [], []
        for step in range(args.warmup + args.steps):
            x = torch.randn(rows, WIDTH, generator=g)
            y = x.sum(1) + 0.1 * torch.randn(rows, generator=g)
            ids = torch.randint(0, args.ids, (rows, fields), generator=g) if fields else None
            batch = Batch(x, y, ids=ids)
            timed.seconds, timed.reduced, timed.gathered, timed.reduces, timed.gathers = 0.0, 0, 0, 0, 0
            t0 = time.perf_counter()
            turn = control(timed, len(batch), False, False, False, learner.batch_moments(batch))
            learner.step(batch, (turn, timed))
            if step >= args.warmup:
                walls.append(time.perf_counter() - t0)
                comms.append(timed.seconds)
                reduced.append(timed.reduced)
                gathered.append(timed.gathered)
                calls.append((timed.reduces, timed.gathers))
        params = sum(p.numel() for p in learner.trained_params)
        dense = sum(p.numel() for p in learner.dense_params)
        results.append(
            {
                "model": name,
                "rows_per_rank": rows,
                "params": params,
                "dense_params": dense,
                "step_ms": 1e3 * statistics.median(walls),
                "comm_ms": 1e3 * statistics.median(comms),
                "reduced_bytes": statistics.median(reduced),
                "gathered_bytes": statistics.median(gathered),
                "reduces": max(c[0] for c in calls),
                "gathers": max(c[1] for c in calls),
            }
        )
    if coll is not None:
        coll.close()
    if world.rank == 0:
        Path(args.out).write_text(json.dumps({"world": world.size, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
