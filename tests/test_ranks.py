"""Several ranks under torchrun (gloo on loopback): one step over the union of the ranks' batches, exactly once across ranks.

The step's arithmetic is checked against one learner over the same rows
(``tests/rank_step_worker.py`` under torchrun); the daemon's behaviour -- partitions split
by rank, a quiet rank, kill -9 of a random rank, restarts with another number of ranks,
a non-finite step on one rank -- against the real broker with the ledger model
(``tests/ledger_model.py``), counted exactly.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from streamtrain.daemon.errors import ConfigError
from streamtrain.daemon.ranks import World
from streamtrain.daemon.step import Learner
from streamtrain.streams.ring import Batch
from streamtrain.streams.split import owner
from tests.daemon_util import ROOT, Daemon, write_config
from tests.fault_util import LedgerProducer, assert_exact, in_flight_snapshot, ledger_config, read_ledger, record
from tests.kafka_util import free_port
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


@pytest.fixture(scope="module")
def ranked_states(tmp_path_factory) -> Path:
    """Every case trained by 2 ranks under torchrun, in one launch."""
    out = tmp_path_factory.mktemp("ranked")
    done = torchrun(2, "tests/rank_step_worker.py", ",".join(sorted(CASES)), str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_step_over_two_ranks_is_one_step_over_the_union_of_their_batches(ranked_states, case):
    """2 ranks x B rows give the weights, statistics and totals of one learner over the 2B rows (some steps: rank 1 idle)."""
    ranks = [torch.load(ranked_states / f"{case}-rank{r}.pt", weights_only=True) for r in range(2)]
    one = Learner(case_config(case))
    for step, (x, y, ids) in enumerate(global_batches(case)):
        rows = union_rows(case, step, len(y), 2)
        one.step(Batch(x[rows], y[rows], ids=ids[rows] if ids is not None else None))
    want = one.state_dict()
    for name, value in ranks[0]["model"].items():  # the replicas are identical, bit for bit
        assert torch.equal(value, ranks[1]["model"][name]), name
        torch.testing.assert_close(value, want["model"][name], rtol=1e-4, atol=1e-5, msg=name)
    for part in ("normalizer", "target"):
        for k in ("count", "mean", "m2", "counts"):
            if k in want[part]:
                torch.testing.assert_close(ranks[0][part][k], want[part][k], rtol=1e-6, atol=1e-6, msg=f"{part}.{k}")
    if "sparse_optimizer" in want:  # the tables' optimizer state too (Adagrad's sums of the rows each rank touched)
        for a, b in zip(ranks[0]["sparse_optimizer"]["state"].values(), ranks[1]["sparse_optimizer"]["state"].values()):
            assert torch.equal(a["sum"], b["sum"])
    assert ranks[0]["trainer"]["step"] == want["trainer"]["step"] and ranks[0]["trainer"]["samples"] == want["trainer"]["samples"]
    for k, v in want["prequential"].items():
        assert ranks[0]["prequential"][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k


# ----------------------------------------------------------------------------- the daemon on several ranks


def launch_ranks(
    tmp_path: Path, cfg: dict, name: str, ranks: int, max_restarts: int = 0, env: dict | None = None, launcher: str = "streamtrain"
) -> Daemon:
    """``streamtrain run --nproc-per-node`` (``launcher="torchrun"``: torchrun's own command line)."""
    path = write_config(tmp_path / f"{name}.yaml", cfg)
    if ranks == 1:
        return Daemon(path, tmp_path / f"{name}.log", env=env)
    return Daemon(path, tmp_path / f"{name}.log", ranks=ranks, max_restarts=max_restarts, env=env, launcher=launcher)


def merged(d: Daemon) -> dict[str, float]:
    """The trained offsets every rank reports for its own partitions, together."""
    out: dict[str, float] = {}
    for m in d.rank_metrics():
        out.update({k: v for k, v in m.items() if k.startswith("streamtrain_trained_offset")})
    return out


def wait_drained(d: Daemon, topic: str, producer: LedgerProducer, timeout: float = 120.0) -> None:
    want = {f'streamtrain_trained_offset{{partition="{p}",topic="{topic}"}}': e for p, e in enumerate(producer.end) if e}
    deadline = time.monotonic() + timeout
    while True:
        got = merged(d)
        if all(got.get(k, -1) >= v for k, v in want.items()):
            return
        if d.proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"not drained (exit {d.proc.poll()}): {got} vs {want}; log:\n{d.log()[-4000:]}")
        time.sleep(0.2)


def settled_ranks(d: Daemon, timeout: float = 15.0) -> list[dict[str, float]]:
    """Every rank's metrics once their step and skip counters stop moving (two reads 0.5 s apart agree)."""

    def counters(ms: list[dict[str, float]]) -> list[tuple]:
        keys = ("streamtrain_steps_total", "streamtrain_steps_skipped")
        return [tuple(sorted((k, v) for k, v in r.items() if k.startswith(keys))) for r in ms]

    deadline = time.monotonic() + timeout
    m = d.rank_metrics()
    while True:
        time.sleep(0.5)
        again = d.rank_metrics()
        if counters(again) == counters(m) or time.monotonic() > deadline:
            return again
        m = again


def stop_ranks(d: Daemon, ranks: int) -> None:
    """SIGTERM to torchrun (or the one daemon): every rank stops at the same step, rank 0 writes the final snapshot."""
    code, _ = d.terminate(timeout=60)
    log = d.log()
    if ranks == 1 or d.launcher == "streamtrain":
        assert code == 0, log[-3000:]  # streamtrain run --nproc-per-node: 0 once every rank stopped cleanly
    # torchrun forwards the signal to its ranks; it then exits 1 itself (it re-raises the signal as an exception)
    assert log.count("stopped (exit 0)") == max(1, ranks), log[-4000:]
    assert "final snapshot" in log, log[-4000:]


@pytest.mark.integration
def test_partitions_split_by_rank_and_a_quiet_rank_neither_blocks_nor_stalls(tmp_path, bootstrap, make_topic):
    """3 partitions on 2 ranks, partition 1 silent (the only one of its rank): the other rank trains all; the ledger is exact."""
    topic = make_topic(3)
    assert owner((topic, 1), 2) != owner((topic, 0), 2) == owner((topic, 2), 2)  # partition 1 is its rank's only one
    idle = owner((topic, 1), 2)
    cfg = ledger_config(tmp_path, bootstrap, topic, partitions=3)
    producer = LedgerProducer(bootstrap, topic, partitions=3, silent=(1,))
    producer.send(3000)
    producer.producer.flush(30)
    d = launch_ranks(tmp_path, cfg, "two", 2, launcher="torchrun")  # torchrun's own command line keeps working
    wait_drained(d, topic, producer)
    m = d.rank_metrics()
    assert m[idle]["streamtrain_samples_trained_total"] == 0 and m[1 - idle]["streamtrain_samples_trained_total"] == 3000
    assert m[idle]["streamtrain_steps_total"] == m[1 - idle]["streamtrain_steps_total"] > 0  # it took part in every step
    assert m[idle][f'streamtrain_rank_info{{local_rank="{idle}",rank="{idle}",world_size="2"}}'] == 1
    producer.send(600)  # still live after the idle stretch
    producer.producer.flush(30)
    wait_drained(d, topic, producer)
    stop_ranks(d, 2)
    ledger = read_ledger(tmp_path / "snapshots")
    lost, dup = assert_exact(ledger, producer)
    meta = ledger["meta"]
    assert meta["world_size"] == 2 and {(t, p) for t, p, *_ in meta["positions"]} == {(topic, p) for p in range(3)}
    record(
        "2 ranks, 3 partitions, one silent",
        trials=1,
        produced=producer.total,
        lost=lost,
        duplicated=dup,
        recovery="-",
        notes="the idle rank took part in every step with 0 samples; nothing blocked",
    )


@pytest.mark.integration
@pytest.mark.fault
def test_kill_9_of_a_random_rank_then_one_rank_then_three_exactly_once(tmp_path, bootstrap, make_topic):
    """2 ranks under torchrun --max-restarts, a producer writing, kill -9 of a random rank (some during a snapshot write):
    torchrun restarts the group from the snapshot; then the same snapshot directory with 1 rank, then 3: the ledger stays exact."""
    topic = make_topic(4)
    cfg = ledger_config(tmp_path, bootstrap, topic, ledger={"ballast_mb": 8}, snapshot={"every_seconds": 0.7, "keep": 2})
    snaps = tmp_path / "snapshots"
    producer = LedgerProducer(bootstrap, topic)
    producer.start(rate=2000)
    rng = random.Random(5)
    kills, during_write = 0, 0
    d = launch_ranks(tmp_path, cfg, "killed", 2, max_restarts=20)
    try:
        for i in range(4):
            pids = wait_ranks_training(d, 2, timeout=90)
            if i % 2 == 1:  # aim at a snapshot write: kill the moment one is under way
                deadline = time.monotonic() + 10
                while not in_flight_snapshot(snaps) and time.monotonic() < deadline:
                    time.sleep(0.002)
            else:
                time.sleep(rng.uniform(0.2, 1.5))
            victim = rng.randrange(2)
            os.kill(pids[victim], signal.SIGKILL)
            kills += 1
            during_write += in_flight_snapshot(snaps)
            wait_restarted(d, pids, timeout=60)
        wait_ranks_training(d, 2, timeout=90)
    finally:
        producer.stop()
    wait_drained(d, topic, producer)
    stop_ranks(d, 2)
    assert_exact(read_ledger(snaps), producer)
    assert kills >= 4 and during_write >= 1, f"{kills} kills, {during_write} during a snapshot write"
    for ranks in (1, 3):  # the same snapshot directory, re-split over another number of ranks
        producer.send(1500)
        producer.producer.flush(30)
        d = launch_ranks(tmp_path, {**cfg, "metrics": {**cfg["metrics"], "port": free_port(span=ranks)}}, f"ranks{ranks}", ranks)
        wait_drained(d, topic, producer)
        stop_ranks(d, ranks)
        ledger = read_ledger(snaps)
        lost, dup = assert_exact(ledger, producer)
        assert ledger["meta"]["world_size"] == ranks
    record(
        "kill -9 of a random rank of 2 (torchrun restarts the group), then 1 rank, then 3",
        trials=kills,
        produced=producer.total,
        lost=lost,
        duplicated=dup,
        recovery="torchrun --max-restarts",
        notes=f"{during_write} kills during a snapshot write; every partition re-split at each world size",
    )


@pytest.mark.integration
@pytest.mark.fault
def test_a_non_finite_step_or_a_decoder_crash_on_one_rank_stops_no_rank(tmp_path, bootstrap, make_topic):
    """Non-finite losses on either rank skip the step on both; records that crash one rank's decoder are dead-lettered
    by that rank alone, in-process, while the other goes on: nobody waits in a collective for a rank that is gone."""
    topic = make_topic(4)
    cfg = ledger_config(tmp_path, bootstrap, topic, ledger={"poison_rate": 0.1})
    producer = LedgerProducer(bootstrap, topic)
    crashing = [p for p in range(4) if owner((topic, p), 2) == 1]  # the partitions of rank 1
    poison: set[tuple[int, int]] = set()

    def value(p: int, s: int) -> bytes | None:
        if p in crashing and s % 500 == 250:
            poison.add((p, s))
            return b"POISON-POISON-PO"  # a raw record's 16 bytes: decoded, it would train
        return None

    producer.send(6000, value)
    producer.producer.flush(30)
    started = time.monotonic()
    d = launch_ranks(tmp_path, cfg, "poisoned", 2, env={"STREAMTRAIN_FAILPOINTS": "decode=raise:POISON"})
    wait_drained(d, topic, producer)
    took = time.monotonic() - started
    m = settled_ranks(d)  # the last step may still be counting when the offsets reach the end
    skipped = [sum(v for k, v in r.items() if k.startswith("streamtrain_steps_skipped_total")) for r in m]
    assert skipped[0] == skipped[1] > 0, skipped  # the same steps skipped on both ranks (each poisons its own)
    assert m[0]["streamtrain_steps_total"] == m[1]["streamtrain_steps_total"]
    crashes = [r.get('streamtrain_records_rejected_total{reason="decoder_crash"}', 0) for r in m]
    assert crashes == [0, len(poison)], crashes
    assert took < 60, f"drained in {took:.0f} s: a rank waited for the collective timeout (rank_timeout_s, 120 s)"
    stop_ranks(d, 2)
    ledger = read_ledger(tmp_path / "snapshots")
    excluded = {"count": [0] * 4, "seqsum": [0] * 4}
    for p, s in poison:
        excluded["count"][p] += 1
        excluded["seqsum"][p] += s
    lost, dup = assert_exact(ledger, producer, excluded)  # trained + skipped (dead-lettered) == produced - crashers
    assert ledger["skipped_steps"] == skipped[0]
    assert d.log().count("crashed the decoder") == len(poison)
    record(
        "non-finite loss on one rank of 2, decoder crashes on the other",
        trials=int(skipped[0]) + len(poison),
        produced=producer.total,
        lost=lost,
        duplicated=dup,
        recovery="-",
        notes=f"every rank skipped the same steps; {len(poison)} decoder_crash records dead-lettered by rank 1 alone",
    )


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def wait_ranks_training(d: Daemon, ranks: int, timeout: float) -> list[int]:
    """Every rank up and past a step; returns their pids."""
    deadline = time.monotonic() + timeout
    while True:
        pids = d.rank_pids()
        if len(pids) == ranks and all(m.get("streamtrain_steps_total", 0) >= 1 for m in d.rank_metrics()):
            return pids
        if d.proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"ranks not training (torchrun exit {d.proc.poll()}); log:\n{d.log()[-4000:]}")
        time.sleep(0.1)


def wait_restarted(d: Daemon, old: list[int], timeout: float) -> None:
    """torchrun has stopped what was left of the group and started new ranks."""
    deadline = time.monotonic() + timeout
    while True:
        pids = d.rank_pids()
        if pids and not set(pids) & set(old):
            return
        if d.proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"no restart (torchrun exit {d.proc.poll()}); log:\n{d.log()[-4000:]}")
        time.sleep(0.05)


@pytest.mark.integration
@pytest.mark.fault
@pytest.mark.parametrize("sig", [signal.SIGTERM], ids=["control-group-term"])
def test_a_signal_to_every_process_stops_every_rank_cleanly(tmp_path, bootstrap, make_topic, sig):
    """systemd's control-group stop (KillMode=control-group) signals every process: each rank gets it from systemd and once
    more from the launcher (torch.distributed.run's agent), which forwards it; their ingest processes get it too.  (The
    ranks run in sessions of their own, so a terminal's Ctrl-C reaches the launcher alone, which forwards it: one copy.)
    The launch then exits 0, as a service manager must see it."""
    topic = make_topic(4)
    cfg = ledger_config(tmp_path, bootstrap, topic)
    producer = LedgerProducer(bootstrap, topic)
    producer.start(rate=2000)
    d = launch_ranks(tmp_path, cfg, "group", 2)
    try:
        wait_ranks_training(d, 2, timeout=90)
        time.sleep(1.0)
        everyone = [d.proc.pid, *d.rank_pids()]
        everyone += [c for pid in everyone[1:] for c in children(pid)]
        for pid in everyone:  # as the cgroup's kill: at once, in no particular order
            os.kill(pid, sig)
        code = d.wait_exit(60)
    finally:
        producer.stop()
    log = d.log()
    assert log.count("stopped (exit 0)") == 2 and "final snapshot" in log, log[-4000:]
    assert code == 0 and "every rank of this host (2) stopped cleanly" in log, (code, log[-4000:])  # a service manager's success
    # the copy torchrun forwards arrives while a rank stops (most runs log "(forwarded by torchrun)"), or after it left
    assert "exiting now" not in log, "the forwarded copy of the signal was taken for a second one"
    d = launch_ranks(tmp_path, cfg, "drain", 2)
    wait_drained(d, topic, producer)
    stop_ranks(d, 2)
    lost, dup = assert_exact(read_ledger(tmp_path / "snapshots"), producer)
    record(
        f"{sig.name} to every process (streamtrain run --nproc-per-node 2, its ranks, their ingest: a control-group stop)",
        trials=1,
        produced=producer.total,
        lost=lost,
        duplicated=dup,
        recovery="both ranks exit 0 after the final snapshot, and so does the launch",
        notes="the launcher's forwarded copy is the same stop",
    )


@pytest.mark.integration
def test_a_rank_that_fails_makes_the_launch_fail_with_its_exit_status_and_names_it(tmp_path, bootstrap, make_topic):
    """``streamtrain run --nproc-per-node 2`` with the snapshot directory locked by another process: rank 0 exits 3
    (locked), the launch stops the other rank and exits 3 itself, naming the rank -- not 0, not torchrun's generic 1."""
    from streamtrain.daemon.snapshot import SnapshotStore

    topic = make_topic(2)
    cfg = ledger_config(tmp_path, bootstrap, topic, partitions=2)
    holder = SnapshotStore(tmp_path / "snapshots")
    holder.lock()  # as a second daemon on the same directory would hold it
    try:
        d = launch_ranks(tmp_path, cfg, "locked", 2)
        code = d.wait_exit(90)
    finally:
        holder.unlock()
    log = d.log()
    assert code == 3, (code, log[-4000:])
    assert "rank 0 (local rank 0 on" in log and "failed: exit 3" in log, log[-4000:]
