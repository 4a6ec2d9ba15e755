"""Training on 1 and on N ranks under torchrun, side by side: samples/s over the same prefilled topic.

``python -m bench.ranks --ranks 1,2 --samples 200000 --repeat 2``: for each run a fresh topic
of ``--samples`` raw records (4 partitions) is filled first, then the daemon trains it to
the end, launched alone (1) or as N ranks (``streamtrain run --nproc-per-node N``); the rate is
the samples trained between the first step and the last record, read from every rank's
/metrics.  Every rank runs its own ingest process, so on a small machine the ranks share
the cores with each other, their ingest processes and the broker: the table says what
several ranks cost or gain here, not on the machine they are for.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

from bench.common import MODELS, Broker, fill_topic, machine, print_machine, quiet_logs, records, table, unique
from bench.common import daemon_config as bench_config
from demo.broker import free_port
from streamtrain.config.schema import config_to_dict


def scrape(port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return {}
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


def run(bootstrap: str, ranks: int, n: int, model: str, workdir: Path) -> tuple[float, list[float]]:
    topic = unique("bench-ranks")
    fill_topic(bootstrap, topic, records("raw", n))
    port = free_port()
    snaps = workdir / topic
    cfg = config_to_dict(bench_config(bootstrap, topic, "raw", MODELS[model], str(snaps), metrics={"enabled": True, "port": port}))
    cfg["metrics"]["host"] = "127.0.0.1"
    path = workdir / f"{topic}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "streamtrain", "run", "--config", str(path)]
    if ranks > 1:
        cmd.append(f"--nproc-per-node={ranks}")  # torch.distributed.run, as torchrun --standalone
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        t0 = s0 = None
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            per_rank = [scrape(port + r).get("streamtrain_samples_trained_total", 0.0) for r in range(ranks)]
            total = sum(per_rank)
            if t0 is None and total > 0:
                t0, s0 = time.monotonic(), total
            if total >= n:
                return (total - s0) / (time.monotonic() - t0), per_rank
            time.sleep(0.05)
        raise TimeoutError(f"{ranks} rank(s) did not train {n} samples in 600 s")
    finally:
        proc.terminate()
        proc.wait(60)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", default="1,2")
    ap.add_argument("--samples", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--model", default="mlp", choices=sorted(MODELS))
    ap.add_argument("--bootstrap", default=None, help="an external broker (default: the embedded one)")
    args = ap.parse_args(argv)
    quiet_logs()
    print_machine(machine())
    counts = [int(r) for r in args.ranks.split(",") if r]
    best: dict[int, tuple[float, list[float]]] = {}
    workdir = Path(tempfile.mkdtemp(prefix="bench-ranks-"))
    try:
        with Broker(args.bootstrap) as broker:
            for _ in range(args.repeat):  # interleaved: side by side
                for r in counts:
                    rate, per_rank = run(broker.bootstrap, r, args.samples, args.model, workdir)
                    print(f"{r} rank(s): {rate:,.0f} samples/s, per rank {[int(v) for v in per_rank]}", flush=True)
                    if rate > best.get(r, (0.0, []))[0]:
                        best[r] = (rate, per_rank)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    base = best[counts[0]][0]
    rows = [[str(r), f"{best[r][0]:,.0f}", f"{best[r][0] / base:.2f}x"] for r in counts]
    print()
    print(table(["ranks", f"samples/s ({args.model}, raw, best of {args.repeat})", f"x {counts[0]} rank(s)"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
