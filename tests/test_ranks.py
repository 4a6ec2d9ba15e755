"""Several ranks under torchrun (gloo on loopback): one step over the union of the ranks' batches, exactly once across ranks.

The step's arithmetic is checked against one learner over the same rows
(``tests/rank_step_worker.py`` under torchrun); the daemon's behaviour -- partitions split
by rank, a quiet rank, kill -9 of a random rank, restarts with another number of ranks,
a non-finite step on one rank -- against the real broker with the ledger model
(``tests/ledger_model.py``), counted exactly.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from streamtrain.daemon.errors import ConfigError
from streamtrain.daemon.ranks import World
from streamtrain.daemon.step import Learner
from streamtrain.streams.ring import Batch
from tests.daemon_util import ROOT
from tests.rank_cases import CASES, case_config, global_batches, union_rows


def torchrun(ranks: int, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_world_comes_from_torchruns_environment():
    assert World.from_env({}) == World(0, 1, 0, 1) and not World.from_env({}).ranked
    w = World.from_env({"RANK": "2", "WORLD_SIZE": "3", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})
    assert (w.rank, w.size, w.local_rank, w.ranked, w.leader) == (2, 3, 0, True, False)
    with pytest.raises(ConfigError, match="RANK='x'"):
        World.from_env({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(ConfigError, match="not a rank of that world"):
        World.from_env({"RANK": "2", "WORLD_SIZE": "2"})


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_step_over_two_ranks_is_one_step_over_the_union_of_their_batches(tmp_path, case):
    """2 ranks x B rows give the weights, statistics and totals of one learner over the 2B rows (some steps: rank 1 idle)."""
    done = torchrun(2, "tests/rank_step_worker.py", case, str(tmp_path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    one = Learner(case_config(case))
    for step, (x, y) in enumerate(global_batches(case)):
        rows = union_rows(case, step, len(y), 2)
        one.step(Batch(x[rows], y[rows]))
    want = one.state_dict()
    for name, value in ranks[0]["model"].items():  # the replicas are identical, bit for bit
        assert torch.equal(value, ranks[1]["model"][name]), name
        torch.testing.assert_close(value, want["model"][name], rtol=1e-4, atol=1e-5, msg=name)
    for part in ("normalizer", "target"):
        for k in ("count", "mean", "m2"):
            torch.testing.assert_close(ranks[0][part][k], want[part][k], rtol=1e-6, atol=1e-6, msg=f"{part}.{k}")
    assert ranks[0]["trainer"]["step"] == want["trainer"]["step"] and ranks[0]["trainer"]["samples"] == want["trainer"]["samples"]
    for k, v in want["prequential"].items():
        assert ranks[0]["prequential"][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
