"""Run under torchrun by tests/test_ranks.py: a Learner per rank steps over fixed batches, as the daemon's ranked loop does.

``python -m torch.distributed.run --nproc-per-node=N tests/rank_step_worker.py CASE[,CASE...] OUT``:
for each case every rank takes its share of each of the case's global batches (rank r: rows
r::N, or none at the steps the case leaves it out), agrees on the turn and steps; each rank
saves its final state to ``OUT/<case>-rank<r>.pt`` so the test can compare them with one
learner over the whole batches.  One launch for every case: starting ranks is the slow part.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from streamtrain.daemon.ranks import Collectives, World, control
from streamtrain.daemon.step import Learner
from streamtrain.streams.ring import Batch
from tests.rank_cases import CASES, case_config, global_batches, rank_rows


def main(cases: str, out: str) -> None:
    world = World.from_env()
    coll = None
    for case in cases.split(","):
        learner = Learner(case_config(case), world)
        coll = coll or Collectives(world, learner.device, 60)
        for step, (x, y, ids) in enumerate(global_batches(case)):
            rows = rank_rows(case, step, len(y), world.rank, world.size)
            batch = Batch(x[rows], y[rows], ids=ids[rows] if ids is not None else None)
            turn = control(coll, len(batch), False, False, False, learner.batch_moments(batch))
            if turn.samples:
                learner.step(batch, (turn, coll))
        torch.save(learner.state_dict(), Path(out) / f"{case}-rank{world.rank}.pt")
    coll.close()


if __name__ == "__main__":
    assert CASES  # the module is importable
    main(sys.argv[1], sys.argv[2])
