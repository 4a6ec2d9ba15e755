"""Start-up: from ``streamtrain run`` to the first trained sample, and the CLI commands' start times.

``python -m bench.restart --repeat 5``: each run fills a fresh topic with ``--records`` JSON
records (4 partitions) first, so data is waiting, then starts the daemon and polls its
/metrics every 20 ms: *metrics up* is the first answer, *first sample* the first scrape with
``streamtrain_samples_trained_total > 0``.  Cases: one rank; 2 ranks
(``--nproc-per-node 2``); one rank again on the snapshot a kill -9 left (a crash
recovery: the snapshot loaded, the offsets resumed).  Beside them, in the same run, a fresh
interpreter's ``import torch``: the floor under every start that trains.  Then each
command that does not train (``--help``, ``check-config``, ``snapshots list``, ``produce
--help``), timed as a user's shell runs it, with whether it imported torch.  Medians of
``--repeat``; the machine says what else was running.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

from bench.common import MODELS as SPECS
from bench.common import Broker, fill_topic, machine, print_machine, quiet_logs, records, table, unique
from bench.common import daemon_config as bench_config
from demo.broker import free_port
from streamtrain.config.schema import config_to_dict

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def trained(port: int) -> float | None:
    """Samples trained so far, or None while /metrics does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as r:
            text = r.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("streamtrain_samples_trained_total "):
            return float(line.split()[1])
    return 0.0


def config(bootstrap: str, topic: str, snaps: Path, model: str, workdir: Path) -> tuple[Path, int]:
    port = free_port(span=2)
    cfg = config_to_dict(bench_config(bootstrap, topic, "json", SPECS[model], str(snaps), metrics={"enabled": True, "port": port}))
    cfg["metrics"]["host"] = "127.0.0.1"
    cfg["snapshot"]["every_steps"] = 5  # a crash leaves a snapshot to recover from
    path = workdir / f"{topic}-{port}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, port


def start(path: Path, port: int, ranks: int, timeout: float = 120.0) -> tuple[float, float, subprocess.Popen]:
    """(seconds to /metrics up, seconds to the first trained sample, the process)."""
    cmd = [sys.executable, "-m", "streamtrain", "run", "--config", str(path)]
    if ranks > 1:
        cmd.append(f"--nproc-per-node={ranks}")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, start_new_session=True)
    up = first = None
    deadline = t0 + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        n = trained(port)
        now = time.monotonic() - t0
        if n is not None and up is None:
            up = now
        if n:
            first = now
            break
        time.sleep(0.02)
    if first is None:
        stop(proc, signal.SIGKILL)
        raise RuntimeError(f"{ranks} rank(s): no sample trained within {timeout:.0f} s (exit {proc.poll()})")
    return up, first, proc


def wait_snapshot(snaps: Path, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not any(p.name.startswith("snap-") for p in snaps.glob("snap-*")):
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"no snapshot in {snaps} within {timeout:.0f} s (exit {proc.poll()})")
        time.sleep(0.05)


def append(bootstrap: str, topic: str, values: list[bytes]) -> None:
    from bench.common import PARTITIONS, producer

    p = producer(bootstrap)
    for i, v in enumerate(values):
        while True:
            try:
                p.produce(topic, v, partition=i % PARTITIONS)
                break
            except BufferError:
                p.poll(0.05)
    if p.flush(120):
        raise RuntimeError(f"appending to {topic}: records undelivered")


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def import_torch() -> float:
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-c", "import torch"], check=True, env=ENV)
    return time.monotonic() - t0


def commands(workdir: Path, cfg: Path) -> list[tuple[str, list[str]]]:
    snaps = workdir / "empty-snapshots"
    snaps.mkdir(exist_ok=True)
    return [
        ("streamtrain --help", ["--help"]),
        ("streamtrain check-config F", ["check-config", str(cfg)]),
        ("streamtrain snapshots list", ["snapshots", "list", "--dir", str(snaps)]),
        ("streamtrain produce --help", ["produce", "--help"]),
    ]


def time_command(argv: list[str]) -> tuple[float, bool]:
    probe = "import sys, runpy\nsys.argv = ['streamtrain', *sys.argv[1:]]\ntry:\n    runpy.run_module('streamtrain', run_name='__main__')\nexcept SystemExit:\n    pass\nsys.stderr.write('torch' if 'torch' in sys.modules else '-')\n"  # noqa: E501
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, env=ENV)
    return time.monotonic() - t0, done.stderr.endswith("torch")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--records", type=int, default=20_000)
    ap.add_argument("--model", default="mlp", choices=sorted(SPECS))
    ap.add_argument(
        "--cases", default="1,2,kill-9", help="comma-separated: 1 (one rank), 2 (two ranks), kill-9 (restart on a crash's snapshot)"
    )
    ap.add_argument("--bootstrap", default=None, help="an external broker (default: the embedded one)")
    args = ap.parse_args(argv)
    quiet_logs()
    print_machine(machine())
    cases = [c for c in args.cases.split(",") if c]
    results: dict[str, list[tuple[float, float]]] = {c: [] for c in cases}
    torch_s: list[float] = []
    workdir = Path(tempfile.mkdtemp(prefix="bench-restart-"))
    with Broker(args.bootstrap) as broker:
        for i in range(args.repeat):  # interleaved: side by side
            torch_s.append(import_torch())
            for case in cases:
                topic = unique("bench-restart")
                fill_topic(broker.bootstrap, topic, records("json", args.records, seed=i))
                path, port = config(broker.bootstrap, topic, workdir / topic, args.model, workdir)
                if case == "kill-9":  # a first run that trains a while and is killed, more records, then the measured start
                    _, _, proc = start(path, port, 1)
                    wait_snapshot(workdir / topic, proc)
                    stop(proc, signal.SIGKILL)
                    append(broker.bootstrap, topic, records("json", args.records, seed=100 + i))
                ranks = 2 if case == "2" else 1
                up, first, proc = start(path, port, ranks)
                stop(proc)
                results[case].append((up, first))
                print(
                    f"run {i + 1} {case}: metrics up {up:.2f} s, first sample {first:.2f} s (import torch {torch_s[-1]:.2f} s)", flush=True
                )
        cfg = path
        timed = {name: [time_command(a) for _ in range(args.repeat)] for name, a in commands(workdir, cfg)}
    names = {"1": "1 rank", "2": "2 ranks (--nproc-per-node 2)", "kill-9": "1 rank, after kill -9 (from its snapshot)"}
    med = statistics.median
    floor = med(torch_s)
    rows = []
    for case in cases:
        ups, firsts = [u for u, _ in results[case]], [f for _, f in results[case]]
        rows.append(
            [names[case], f"{med(ups):.2f}", f"{med(firsts):.2f} ({min(firsts):.2f}-{max(firsts):.2f})", f"{med(firsts) - floor:+.2f}"]
        )
    print()
    print(f"`import torch` in a fresh interpreter: median {floor:.2f} s ({min(torch_s):.2f}-{max(torch_s):.2f}), {args.repeat} runs")
    print()
    heads = ["start", "metrics up (s)", f"first trained sample (s), median (range) of {args.repeat}", "- import torch (s)"]
    print(table(heads, rows))
    print()
    rows = [[name, f"{med(t for t, _ in v):.2f}", "yes" if any(imp for _, imp in v) else "no"] for name, v in timed.items()]
    print(table(["command", f"seconds (median of {args.repeat})", "imports torch"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
