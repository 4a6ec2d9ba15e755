"""The fixed batches of the ranked-step equivalence test (tests/test_ranks.py, tests/rank_step_worker.py)."""

from __future__ import annotations

import torch

from streamtrain.config.schema import Config, config_from_dict

WIDTH = 4
STEPS = 12
IDLE_STEPS = (3, 7)  # rank 1 has nothing at these steps

CASES = {
    # features of very different scales (a timestamp among them), a label far from 0
    "regression": {"model": {"name": "linear"}, "trainer": {"task": "regression", "optimizer": "sgd", "lr": 0.05}},
    "huber": {"model": {"name": "mlp", "params": {"hidden": [8]}}, "trainer": {"task": "regression", "loss": "huber", "optimizer": "sgd"}},
    "binary": {"model": {"name": "logistic"}, "trainer": {"task": "binary", "optimizer": "sgd", "lr": 0.1}},
    "multiclass": {
        "model": {"name": "mlp", "params": {"hidden": [8], "out_features": 3}},
        "trainer": {"task": "multiclass", "num_classes": 3, "optimizer": "sgd", "momentum": 0.9, "grad_clip_norm": 0.5},
    },
    # categorical ids (sparse rows summed over the ranks) and missing numbers (per-column counts summed too)
    "categorical": {
        "data": {"format": "json", "features": ["a", "b", "c", "d"], "categorical": ["u", "i"], "hash_buckets": 64},
        "model": {"name": "fm", "params": {"embedding_dim": 4}},
        "trainer": {"task": "binary", "optimizer": "sgd", "lr": 0.1, "sparse_lr": 0.2},
    },
}
FIELDS = {"categorical": 2}  # categorical fields per case (the others have none)


def case_config(case: str, snapshot_dir: str = "/nonexistent") -> Config:
    raw = {
        "kafka": {"topics": ["t"]},
        "data": {"format": "raw", "num_features": WIDTH},
        "snapshot": {"dir": snapshot_dir},
        "trainer": {"num_threads": 1},
    }
    for k, v in CASES[case].items():
        raw.setdefault(k, {}).update(v)
    return config_from_dict(raw)


def global_batches(case: str) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    g = torch.Generator().manual_seed(3)
    out = []
    for step in range(STEPS):
        n = 16 + step % 5
        x = torch.randn(n, WIDTH, generator=g) * torch.tensor([1.0, 100.0, 0.01, 1.0]) + torch.tensor([0.0, 0.0, 0.0, 1.7e9])
        score = x[:, 0] - 0.02 * x[:, 1] + 50 * x[:, 2]
        ids = None
        if case in ("regression", "huber"):
            y = 3 * score + 1e4
        elif case in ("binary", "categorical"):
            y = (score > 0).float()
        else:
            y = torch.bucketize(score, torch.tensor([-0.5, 0.5])).float()
        if case in FIELDS:
            ids = torch.randint(0, 64, (n, FIELDS[case]), generator=g)
            x[torch.rand(n, WIDTH, generator=g) < 0.15] = float("nan")  # missing numbers, imputed
        out.append((x, y, ids))
    return out


def rank_rows(case: str, step: int, n: int, rank: int, world: int) -> torch.Tensor:
    """The rows of global batch ``step`` that ``rank`` holds: every world-th one; none for rank 1 at IDLE_STEPS."""
    if step in IDLE_STEPS:
        return torch.arange(n) if rank == 0 else torch.arange(0)
    return torch.arange(rank, n, world)


def union_rows(case: str, step: int, n: int, world: int) -> torch.Tensor:
    """The rows one learner steps over to equal the ranks' step: theirs, in rank order."""
    return torch.cat([rank_rows(case, step, n, r, world) for r in range(world)])
