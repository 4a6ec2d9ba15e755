"""What one training step costs, alone: ``python -m bench.step``.

``Trainer.step`` on batches already in memory (no Kafka, no ring), for a model, batch
size and task, on the CPU with one torch thread (or ``--device cuda``), with the
optimizer named explicitly so that two versions of the trainer do the same optimizer
work.  To see what a change to the step costs, run this file against two checkouts,
alternately (``PYTHONPATH=/path/to/checkout python bench/step.py``), and compare the
ratios of one run each, side by side.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import tempfile
import time

import torch

from streamtrain.config.schema import config_from_dict
from streamtrain.daemon.metrics import Metrics
from streamtrain.daemon.trainer import Trainer
from streamtrain.streams.ring import Batch


def rate(
    model: str,
    batch_size: int,
    task: str,
    steps: int,
    device: str = "cpu",
    width: int = 16,
    optimizer: dict | None = None,
    params: dict | None = None,
    fields: int = 0,
    candidates: int = 1,
    stack: str = "auto",
) -> float:
    """Samples/s of ``Trainer.step`` over ``steps`` steps (after 200 to warm up); ``fields``: categorical fields (Zipf ids).

    ``candidates``: that many learners side by side (``trainer.candidates``: the default and learning rates 10 %, 20 %, ...
    above it), each taking every batch; ``stack``: ``trainer.candidates_stack`` (auto: as one stacked model, off: looped).
    """
    params = params if params is not None else ({"hidden": [64]} if model == "mlp" else {})
    data = {"format": "raw", "num_features": width}
    if fields:
        data = {"format": "json", "features": [f"f{i}" for i in range(width)], "categorical": [f"c{j}" for j in range(fields)]}
    raw = {
        "kafka": {"topics": ["t"]},
        "data": data,
        "model": {"name": model, "params": params},
        "trainer": {
            "task": task,
            "device": device,
            "num_threads": 1,
            **({"num_classes": 3} if task == "multiclass" else {}),
            **(optimizer or {}),
            **({"candidates": [{"trainer.lr": (optimizer or {}).get("lr", 1e-3) * (1 + 0.1 * i)} for i in range(1, candidates)]}),
            "candidates_stack": stack,
        },
        "ring": {"batch_size": batch_size},
        "snapshot": {"dir": tempfile.mkdtemp(prefix="streamtrain-bench-"), "every_seconds": 0},
    }
    t = Trainer(config_from_dict(raw), Metrics())
    t.setup(stream=False)
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64 * batch_size, width, generator=g)
        y = {"binary": (x.sum(1) > 0).float(), "multiclass": (x[:, 0] > 0).float() + (x[:, 1] > 0).float()}.get(task, x.sum(1))
        buckets = t.cfg.data.hash_buckets
        zipf = torch.distributions.Categorical(probs=1.0 / torch.arange(1, buckets + 1) ** 1.05)
        ids = zipf.sample((len(y), fields)) if fields else None  # rows of the table, skewed as ids are
        batches = [
            Batch(x[i : i + batch_size], y[i : i + batch_size], ids=ids[i : i + batch_size] if fields else None)
            for i in range(0, len(y), batch_size)
        ]
        for i in range(20 if fields else 200):
            t.step(batches[i % len(batches)])
        t0 = time.perf_counter()
        for i in range(steps):
            t.step(batches[i % len(batches)])
        return steps * batch_size / (time.perf_counter() - t0)
    finally:
        t.ready = False
        t.close()


ADAMW = {"optimizer": "adamw", "lr": 1e-3, "grad_clip_norm": 1.0}
SGD = {"optimizer": "sgd", "lr": 0.01, "grad_clip_norm": 0}
CASES = {
    "mlp-256": ("mlp", 256, "regression", ADAMW, None, 0),  # bench.pipeline's small MLP
    "linear-1": ("linear", 1, "regression", SGD, None, 0),
    "logistic-1": ("logistic", 1, "binary", SGD, None, 0),
    "logistic-256": ("logistic", 256, "binary", SGD, None, 0),
    "mlp-3class-1": ("mlp", 1, "multiclass", ADAMW, None, 0),
    "mlp-3class-256": ("mlp", 256, "multiclass", ADAMW, None, 0),
    # the tables updated where a batch has ids (Adagrad on those rows), or every row every step (the same Adagrad, dense)
    "fm-sparse-256": ("fm", 256, "binary", {**SGD, "sparse_optimizer": "adagrad"}, {"embedding_dim": 16}, 4),
    "fm-dense-256": ("fm", 256, "binary", {"optimizer": "sgd", "lr": 0.01, "grad_clip_norm": 0}, {"embedding_dim": 16, "sparse": False}, 4),
}


def calibration_cost(task: str, batch_size: int, calls: int = 2000, repeat: int = 5) -> float:
    """Microseconds per call of the step's calibration sums (daemon/calibration.py) alone, best of ``repeat``."""
    from streamtrain.daemon.calibration import batch_sums

    g = torch.Generator().manual_seed(0)
    classes = 1 if task == "binary" else 3
    out = torch.randn(batch_size, classes, generator=g)
    y = torch.randint(0, max(classes, 2), (batch_size,), generator=g).float()
    for _ in range(200):
        batch_sums(out, y, task)
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(calls):
            batch_sums(out, y, task)
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.step", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of: {', '.join(CASES)}")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--calibration", action="store_true", help="also the calibration sums' cost per step alone (one torch thread)")
    ap.add_argument("--candidates", default="", help="e.g. 1,2,4,8: each case with that many learners side by side (trainer.candidates)")
    ap.add_argument("--stack", default="auto", help="with --candidates: auto (stacked), off (looped), or auto,off (both, side by side)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("streamtrain").setLevel(logging.WARNING)
    counts = [int(k) for k in args.candidates.split(",") if k] or [1]
    for case in [c for c in args.cases.split(",") if c]:
        model, bs, task, opt, params, fields = CASES[case]
        steps = args.steps if not fields else max(50, args.steps // 10)
        one = None
        for k in counts:
            width = 4 if fields else 16
            for stack in args.stack.split(",") if k > 1 else ["auto"]:
                r = rate(model, bs, task, steps, args.device, width, opt, params, fields, candidates=k, stack=stack)
                one = one or r
                how = "" if k == 1 else ", stacked" if stack == "auto" else ", looped"
                label = f"{case}" if counts == [1] else f"{case}, {k} candidate(s){how}"
                print(f"{label}: {r:,.0f} samples/s" + (f" ({one / r:.2f}x the time of one)" if counts != [1] else ""), flush=True)
    if args.calibration:
        torch.set_num_threads(1)
        for task in ("binary", "multiclass"):
            for bs in (1, 256):
                print(f"calibration sums, {task} batch {bs}: {calibration_cost(task, bs):.1f} us a step", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
