"""Training on 1 and on N ranks, side by side: samples/s over the same prefilled topic; what a step's collectives cost.

``python -m bench.ranks --ranks 1,2 --samples 200000 --repeat 2``: for each run a fresh topic
of ``--samples`` raw records (4 partitions) is filled first, then the daemon trains it to
the end, launched alone (1) or as N ranks (``streamtrain run --nproc-per-node N``); the rate is
the samples trained between the first step and the last record, read from every rank's
/metrics.  Every rank runs its own ingest process, so on a small machine the ranks share
the cores with each other, their ingest processes and the broker: the table says what
several ranks cost or gain here, not on the machine they are for.

``--hosts 2`` (root, ``ip netns``): also 2 ranks on two "hosts" -- network namespaces joined
by a bridge (``tests/hosts_util.py``), the broker in the first, one rank on each -- beside
the same 2 ranks on one host, so the collectives cross veth pairs and a bridge instead of
loopback.  The namespaces share this machine's cores: the ratio says what the network path
costs, not what a second machine would add.

``--comm``: per model (``bench/ranks_comm.py``), the bytes each rank puts into a step's
collectives and the time they take (2 ranks on one host, and on 2 hosts with ``--hosts 2``),
then a projection on paper for ``--project 8,64`` hosts on a ``--gbps 25`` network: ring
all-reduce ``2(N-1)/N * bytes / bandwidth + 2(N-1) * latency`` per call for the dense part,
and ``(N-1) * (bytes / bandwidth + latency)`` for the all-gathered rows of the categorical
tables (every rank receives every other's) -- the step time below which the network, not
the step, sets the pace.
"""

from __future__ import annotations

import argparse
import json
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


FILL = """
import sys
from bench.common import fill_topic, records
fill_topic(sys.argv[1], sys.argv[2], records("raw", int(sys.argv[3])))
"""

SCRAPE = """
import sys, time, urllib.request
port = int(sys.argv[1])
while True:  # until killed: the time and this host's samples trained, every 50 ms
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            text = r.read().decode()
        n = next((line.split()[1] for line in text.splitlines() if line.startswith("streamtrain_samples_trained_total ")), "0")
        print(time.monotonic(), n, flush=True)
    except OSError:
        pass
    time.sleep(0.05)
"""


def run_hosts(n: int, model: str, workdir: Path) -> tuple[float, list[float]]:
    """2 ranks, one on each of 2 hosts (network namespaces), the broker on the first; samples/s as :func:`run`."""
    from tests.hosts_util import Hosts, start_broker

    hosts = Hosts(2)
    try:
        bootstrap = start_broker(hosts, 0, workdir / "broker.log")
        topic = unique("bench-hosts")
        done = hosts.run(0, [sys.executable, "-c", FILL, bootstrap, topic, str(n)], timeout=600)
        if done.returncode:
            raise RuntimeError(f"filling {topic} on host 0: {done.stderr[-1000:]}")
        port = 9400
        metrics = {"enabled": True, "port": port}
        cfg = config_to_dict(bench_config(bootstrap, topic, "raw", MODELS[model], str(workdir / topic), metrics=metrics))
        cfg["metrics"]["host"] = "127.0.0.1"  # each host's own loopback
        path = workdir / f"{topic}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        argv = [sys.executable, "-m", "streamtrain", "run", "--config", str(path)]
        procs = [hosts.launch(i, argv, workdir / f"{topic}-{i}.log") for i in range(2)]
        logs = [workdir / f"{topic}-scrape-{i}.log" for i in range(2)]
        for i in range(2):
            hosts.popen(i, [sys.executable, "-c", SCRAPE, str(port)], logs[i])
        t0 = s0 = None
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            per_host = [_last_count(log) for log in logs]
            total = sum(per_host)
            if t0 is None and total > 0:
                t0, s0 = time.monotonic(), total
            if total >= n:
                return (total - s0) / (time.monotonic() - t0), per_host
            if any(p.poll() is not None for p in procs):
                raise RuntimeError(f"a launcher exited ({[p.poll() for p in procs]}); see {workdir}")
            time.sleep(0.05)
        raise TimeoutError(f"2 hosts did not train {n} samples in 600 s")
    finally:
        hosts.close()


def _last_count(log: Path) -> float:
    try:
        lines = log.read_text().splitlines()
    except OSError:
        return 0.0
    return float(lines[-1].split()[1]) if lines and len(lines[-1].split()) == 2 else 0.0


def comm(hosts: int, steps: int, workdir: Path) -> list[dict]:
    """bench/ranks_comm.py over 2 ranks: on one host (``hosts`` 1) or one rank on each of 2 hosts."""
    out = workdir / f"comm-{hosts}.json"
    worker = ["-m", "bench.ranks_comm", str(out), "--steps", str(steps)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if hosts == 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *worker]
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=900)
    else:
        from tests.hosts_util import Hosts

        h = Hosts(2)
        try:
            procs = [h.launch(i, [sys.executable, "-m", "torch.distributed.run"], workdir / f"comm-{i}.log", *worker) for i in range(2)]
            codes = [p.wait(900) for p in procs]
            if codes != [0, 0]:
                raise RuntimeError(f"bench.ranks_comm on 2 hosts exited {codes}; see {workdir}")
        finally:
            h.close()
    return json.loads(out.read_text())["results"]


def projection(rows: list[dict], hosts: list[int], gbps: float, latency_us: float) -> list[list[str]]:
    """Per model: the network time of one step's collectives at N hosts, on paper (the module docstring's model)."""
    bw, lat = gbps * 1e9 / 8, latency_us * 1e-6
    out = []
    for r in rows:
        cells = [r["model"], f"{r['reduces']} / {r['gathers']}", f"{r['step_ms'] - r['comm_ms']:.1f}"]
        for n in hosts:
            dense = 2 * (n - 1) / n * r["reduced_bytes"] / bw + r["reduces"] * 2 * (n - 1) * lat
            rows_ = (n - 1) * r["gathered_bytes"] / bw + r["gathers"] * (n - 1) * lat
            cells.append(f"{1e3 * (dense + rows_):.2f}")
        out.append(cells)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", default="1,2")
    ap.add_argument("--samples", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--model", default="mlp", choices=sorted(MODELS))
    ap.add_argument("--bootstrap", default=None, help="an external broker (default: the embedded one)")
    ap.add_argument("--hosts", type=int, default=1, choices=(1, 2), help="2: also 2 ranks on 2 network namespaces (root)")
    ap.add_argument("--comm", action="store_true", help="each model's collectives per step, and the projection")
    ap.add_argument("--comm-steps", type=int, default=30)
    ap.add_argument("--project", default="8,64", help="host counts the projection is for")
    ap.add_argument("--gbps", type=float, default=25.0)
    ap.add_argument("--latency-us", type=float, default=30.0, help="per message and hop, one way (TCP on a LAN)")
    args = ap.parse_args(argv)
    quiet_logs()
    print_machine(machine())
    if args.comm:
        return main_comm(args)
    counts = [int(r) for r in args.ranks.split(",") if r]
    best: dict[int | str, tuple[float, list[float]]] = {}
    workdir = Path(tempfile.mkdtemp(prefix="bench-ranks-"))
    try:
        with Broker(args.bootstrap) as broker:
            for _ in range(args.repeat):  # interleaved: side by side
                for r in counts:
                    rate, per_rank = run(broker.bootstrap, r, args.samples, args.model, workdir)
                    print(f"{r} rank(s): {rate:,.0f} samples/s, per rank {[int(v) for v in per_rank]}", flush=True)
                    if rate > best.get(r, (0.0, []))[0]:
                        best[r] = (rate, per_rank)
                if args.hosts == 2:
                    rate, per_host = run_hosts(args.samples, args.model, workdir)
                    print(f"2 ranks on 2 hosts: {rate:,.0f} samples/s, per host {[int(v) for v in per_host]}", flush=True)
                    if rate > best.get("2 hosts", (0.0, []))[0]:
                        best["2 hosts"] = (rate, per_host)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    base = best[counts[0]][0]
    keys = [*counts, *(["2 hosts"] if args.hosts == 2 else [])]
    label = {"2 hosts": "2 (1 rank on each of 2 network namespaces)"}
    rows = [[label.get(r, str(r)), f"{best[r][0]:,.0f}", f"{best[r][0] / base:.2f}x"] for r in keys]
    print()
    print(table(["ranks", f"samples/s ({args.model}, raw, best of {args.repeat})", f"x {counts[0]} rank(s)"], rows))
    return 0


def main_comm(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="bench-ranks-comm-"))
    try:
        local = comm(1, args.comm_steps, workdir)
        across = comm(2, args.comm_steps, workdir) if args.hosts == 2 else None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    heads = ["model", "rows/rank", "trained params (dense)", "all-reduced KB/step", "all-gathered KB/step"]
    heads += ["step ms (1 host)", "in collectives ms"]
    if across:
        heads += ["step ms (2 hosts)", "in collectives ms (2 hosts)"]
    rows = []
    for i, r in enumerate(local):
        cells = [r["model"], str(r["rows_per_rank"]), f"{r['params']:,} ({r['dense_params']:,})", f"{r['reduced_bytes'] / 1e3:,.1f}"]
        cells += [f"{r['gathered_bytes'] / 1e3:,.1f}", f"{r['step_ms']:.1f}", f"{r['comm_ms']:.1f}"]
        if across:
            cells += [f"{across[i]['step_ms']:.1f}", f"{across[i]['comm_ms']:.1f}"]
        rows.append(cells)
    print()
    print(f"2 ranks, one torch thread each; medians of {args.comm_steps} steps (time in collectives includes waiting for the other rank)")
    print(table(heads, rows))
    hosts = [int(n) for n in args.project.split(",") if n]
    print()
    print(f"on paper: {args.gbps:g} Gb/s, {args.latency_us:g} us per message and hop; the bytes per rank as measured above")
    heads = ["model", "collectives per step (all-reduce / all-gather)", "compute ms here (step - collectives)"]
    heads += [f"network ms/step at {n} hosts" for n in hosts]
    print(table(heads, projection(across or local, hosts, args.gbps, args.latency_us)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
