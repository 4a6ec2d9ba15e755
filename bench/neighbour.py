"""What a busy second core costs a small model's step: ``python -m bench.neighbour``.

The floor under the data path's cost on a 2-core machine: the ingest process and the
broker keep the other core busy, and even work that shares nothing with the trainer
slows it.  The small MLP's training step (16 -> 64 -> 1, batch 256, AdamW, one torch
thread, pinned to CPU 0) is timed alone, next to a process that only spins on CPU 1,
and next to one that streams through 64 MB of memory on CPU 1; interleaved, best of
``--repeat`` each.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch

from bench.common import machine, print_machine, table

NEIGHBOURS = {
    "alone": None,
    "other core spinning": "while True: pass",
    "other core streaming memory": "import numpy as np\na = np.ones(8_000_000)\nwhile True: a.sum()",
}


def step_us(steps: int) -> float:
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    x, y = torch.randn(256, 16), torch.randn(256, 1)
    for i in range(steps + steps // 5):
        if i == steps // 5:  # the first fifth warms up
            t0 = time.perf_counter()
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return (time.perf_counter() - t0) / steps * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.neighbour", description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    if not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2:
        print("needs Linux and at least 2 CPUs", file=sys.stderr)
        return 2
    print_machine(machine())
    cpus = sorted(os.sched_getaffinity(0))
    torch.set_num_threads(1)
    os.sched_setaffinity(0, {cpus[0]})
    best: dict[str, float] = {}
    for _ in range(args.repeat):
        for name, code in NEIGHBOURS.items():
            proc = None
            if code is not None:
                proc = subprocess.Popen([sys.executable, "-c", f"import os\nos.sched_setaffinity(0, {{{cpus[1]}}})\n{code}"])
                time.sleep(0.3)
            try:
                us = step_us(args.steps)
            finally:
                if proc is not None:
                    proc.kill()
                    proc.wait()
            best[name] = min(best.get(name, us), us)
    alone = best["alone"]
    print(table(["second core", "step", "vs alone"], [[name, f"{us:.0f} us", f"{us / alone:.2f}x"] for name, us in best.items()]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
