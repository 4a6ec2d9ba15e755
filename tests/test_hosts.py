"""Ranks on separate network hosts: network namespaces joined by a bridge, the broker on one of them.

Each host runs ``streamtrain run --nnodes 2 --nproc-per-node 1 --rdzv-endpoint A:port``
(torch.distributed.run's c10d rendezvous across the hosts); the snapshot directory is one
both see, as a volume every host mounts.  Counted with the ledger model
(``tests/ledger_model.py``): no record lost, none trained twice.
"""

from __future__ import annotations

import re
import signal
import sys
import time
from pathlib import Path

import pytest

from tests.daemon_util import write_config
from tests.fault_util import assert_exact, ledger_config, read_ledger, record
from tests.hosts_util import HostProducer, Hosts, skip_reason, start_broker, wait_trained

pytestmark = [pytest.mark.integration, pytest.mark.skipif(bool(skip_reason()), reason=skip_reason() or "")]

PARTITIONS = 4


@pytest.fixture
def hosts():
    h = Hosts(2)
    yield h
    h.close()


def launch(hosts: Hosts, i: int, config: Path, log: Path, *extra: str, endpoint: int = 0):
    """``streamtrain run`` on host i, meeting the others at host ``endpoint``'s rendezvous (``extra``: more options)."""
    return hosts.launch(i, [sys.executable, "-m", "streamtrain", "run", "--config", str(config)], log, *extra, endpoint=endpoint)


def setup(tmp_path: Path, hosts: Hosts, broker_on: int = 0, timeout_s: float = 20, **sections) -> tuple[HostProducer, Path, str]:
    bootstrap = start_broker(hosts, broker_on, tmp_path / "broker.log")
    topic = "ledger"
    producer = HostProducer(hosts, broker_on, bootstrap, topic, PARTITIONS, tmp_path / "produced.json")
    cfg = ledger_config(tmp_path, bootstrap, topic, partitions=PARTITIONS, **sections)
    cfg["trainer"]["rank_timeout_s"] = timeout_s
    return producer, write_config(tmp_path / "hosts.yaml", cfg), topic


def stop_all(procs, logs: list[Path], timeout: float = 60.0) -> list[str]:
    """SIGTERM to every launcher; each must exit 0.  Their logs."""
    for p in procs:
        p.send_signal(signal.SIGTERM)
    codes = [p.wait(timeout) for p in procs]
    text = [log.read_text(errors="replace") for log in logs]
    assert codes == [0] * len(procs), (codes, *(t[-3000:] for t in text))
    return text


@pytest.mark.fault
def test_rank_0s_host_lost_the_other_goes_on_alone_then_the_host_back_rejoins_exactly_once(tmp_path, hosts):
    """Elastic membership (--nnodes 1:2): SIGKILL to every process of the host where rank 0 runs (its launcher, its rank
    in a session of its own, the rank's ingest).  The other host's rank sees its collective fail, its launcher restarts
    it, the rendezvous closes with one host, and it goes on alone, a world of one -- reading every partition, finding
    the snapshot the lost rank 0 wrote in the directory both hosts mount.  The lost host started again rejoins: the
    group restarts with 2 ranks and the partitions re-split.  The ledger is exact across all of it."""
    # the rendezvous (and the broker) on host 1; rank 0 goes to the lowest address, host 0's: the host lost is rank 0's
    producer, config, topic = setup(tmp_path, hosts, broker_on=1)
    producer.send(3000)
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    elastic = ("--nnodes", "1:2", "--max-restarts", "5")
    procs = [launch(hosts, i, config, logs[i], *elastic, endpoint=1) for i in (1, 0)][::-1]
    meta = wait_trained(tmp_path / "snapshots", topic, producer.end, procs, timeout=120, world=2)
    assert "rank 0 of 2" in logs[0].read_text(), "rank 0 is host 0's"
    assert hosts.kill_all(0) >= 3  # the whole host: launcher, rank, ingest
    procs[0].wait(10)
    producer.send(2000)
    meta = wait_trained(tmp_path / "snapshots", topic, producer.end, procs[1:], timeout=120, world=1)
    assert sorted(p for t, p, *_ in meta["positions"]) == list(range(PARTITIONS))  # host 1 reads every partition now
    procs[0] = launch(hosts, 0, config, logs[0], *elastic, endpoint=1)
    producer.send(2000)
    meta = wait_trained(tmp_path / "snapshots", topic, producer.end, procs, timeout=120, world=2)
    stop_all(procs, logs)
    lost, dup = assert_exact(read_ledger(tmp_path / "snapshots"), producer)
    record(
        "rank 0's host lost (SIGKILL to every process), the other host alone, then the host back (--nnodes 1:2)",
        trials=1,
        produced=producer.total,
        lost=lost,
        duplicated=dup,
        recovery="host 1 goes on alone (world 1) from the lost rank 0's snapshot (shared directory); host 0 rejoins at 2",
        notes="2 hosts, c10d rendezvous on host 1, elastic 1:2; partitions re-split at each world size",
    )


@pytest.mark.fault
def test_two_hosts_split_the_partitions_a_host_cut_off_for_30_s_times_out_restarts_and_resumes_exactly_once(tmp_path, hosts):
    """Two hosts meet through the c10d rendezvous and each rank reads its share of the partitions; one snapshot (by
    rank 0, wherever it runs) holds them all.  Then host 1's cable is pulled for 30 s (its port on the switch down).
    Neither rank hears the other: each collective fails within trainer.rank_timeout_s (10 s here, not torch's 30
    minutes), each rank exits 1 with a line naming that timeout, both launchers restart their ranks (--max-restarts)
    and the new round of the rendezvous closes once host 1 is back; the group resumes from rank 0's last snapshot.
    Nothing waits forever.  SIGTERM to both launchers: both exit 0, and the ledger is exact."""
    producer, config, topic = setup(tmp_path, hosts, timeout_s=10)
    producer.send(3000)
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [launch(hosts, i, config, logs[i], "--max-restarts", "3") for i in range(2)]
    meta = wait_trained(tmp_path / "snapshots", topic, producer.end, procs, timeout=120, world=2)
    assert meta["world_size"] == 2, meta
    before = [log.read_text(errors="replace") for log in logs]
    read = [{int(p) for p in re.findall(rf"source: reading {topic}\[(\d+)\]", t)} for t in before]  # each host's partitions
    assert read[0] and read[1] and not read[0] & read[1] and read[0] | read[1] == set(range(PARTITIONS)), read
    assert all("of 2 (local rank 0)" in t for t in before), [t[-3000:] for t in before]
    hosts.cut(1)
    cut = time.monotonic()
    producer.send(2000)  # from host 0, where the broker is: rank 0 has records to train, rank 1 cannot read its share
    timeout_line = re.compile(r"a collective failed, no answer within trainer.rank_timeout_s \(10 s\)")
    deadline = cut + 28
    while time.monotonic() < deadline and not all(timeout_line.search(log.read_text(errors="replace")) for log in logs):
        time.sleep(0.5)
    timed_out = [bool(timeout_line.search(log.read_text(errors="replace"))) for log in logs]
    assert all(p.poll() is None for p in procs), "a launcher gave up while the link was down"
    time.sleep(max(0.0, cut + 30 - time.monotonic()))
    hosts.mend(1)
    assert timed_out == [True, True], [log.read_text(errors="replace")[-3000:] for log in logs]
    producer.send(1000)
    wait_trained(tmp_path / "snapshots", topic, producer.end, procs, timeout=150, world=2)
    text = stop_all(procs, logs)
    for t in text:  # each host's own rank stopped cleanly
        assert "stopped (exit 0)" in t and "every rank of this host (1) stopped cleanly" in t, t[-3000:]
    lost, dup = assert_exact(read_ledger(tmp_path / "snapshots"), producer)
    record(
        "2 hosts (network namespaces, c10d rendezvous); one's link down for 30 s, then up; SIGTERM to both launchers",
        trials=1,
        produced=producer.total,
        lost=lost,
        duplicated=dup,
        recovery="both ranks time out at trainer.rank_timeout_s (10 s) and exit 1; the group restarts once the link is up",
        notes=f"each host's rank read its own partitions ({sorted(read[0])} / {sorted(read[1])}); both launchers exit 0",
    )
