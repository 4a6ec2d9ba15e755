"""The daemon end to end against a real broker: train, snapshot, commit, resume, reject, stop.

Each test runs ``python -m streamtrain run`` as a subprocess and reads what a user would:
its /metrics, its snapshot directory, the consumer group and the dead-letter topic.
"""

from __future__ import annotations

import re
import shutil

import pytest

from demo.synthetic import SyntheticStream
from streamtrain.streams.encode import encode
from tests.daemon_util import FEATURES, Daemon, daemon_config, latest_meta, meta_positions, write_config
from tests.kafka_util import TestProducer, committed_offsets, read_topic

pytestmark = pytest.mark.integration


def produce(
    bootstrap: str, topic: str, n: int, *, seed: int = 0, garbage_every: int = 0, producer: TestProducer | None = None
) -> TestProducer:
    """n synthetic JSON records over 4 partitions; every ``garbage_every``-th one is not JSON."""
    x, y = SyntheticStream(16, seed=seed).batch(n)
    values = encode("json", x, y, FEATURES)
    if garbage_every:
        for i in range(garbage_every // 2, n, garbage_every):
            values[i] = b"\x00garbage" + str(i).encode()
    p = producer or TestProducer(bootstrap)
    p.send_all(topic, values, partitions=4)
    p.flush()
    return p


def start(tmp_path, bootstrap, topic, name="d", **sections) -> Daemon:
    cfg = daemon_config(tmp_path, bootstrap, [topic], **sections)
    return Daemon(write_config(tmp_path / f"{name}.yaml", cfg), tmp_path / f"{name}.log")


def test_trains_every_record_snapshots_and_commits(tmp_path, bootstrap, make_topic):
    topic = make_topic(4)
    n, first = 20_000, 2_000
    x, y = SyntheticStream(16).batch(n)
    values = encode("json", x, y, FEATURES)
    # a first part only: a fast daemon is well into training before a poll sees its first loss
    p = TestProducer(bootstrap)
    p.send_all(topic, values[:first], partitions=4)
    p.flush()
    # progress lines on (the suite's default is off): one a fifth of a second
    d = start(tmp_path, bootstrap, topic, logging={"progress_every_s": 0.2, "level": "INFO"})
    early = d.wait_for("a first loss", lambda m: m.get("streamtrain_steps_total", 0) >= 5, 60)
    p.send_all(topic, values[first:], partitions=4)
    p.flush()
    d.wait_trained(n, timeout=90)
    late = d.settled()
    code, _ = d.terminate()
    assert code == 0, d.log()[-3000:]
    assert re.search(r"step \d+ \| [\d,]+ samples \(\d+/s\) \| loss .* \| mae ", d.log()), "progress lines are logged"

    meta = latest_meta(tmp_path / "snapshots")
    assert meta["samples"] == n
    assert late["streamtrain_samples_trained_total"] == n
    assert meta_positions(meta) == p.end, "snapshot offsets must be the end offsets"
    group = committed_offsets(bootstrap, f"g-{topic}", list(p.end))
    assert group == meta_positions(meta), "the group mirrors the snapshot's offsets"
    assert late["streamtrain_train_loss_ewma"] < 0.5 * early["streamtrain_train_loss_ewma"], "loss must fall on a learnable stream"
    assert late["streamtrain_records_consumed_total"] == n
    assert sum(v for k, v in late.items() if k.startswith("streamtrain_consumer_lag{")) == 0


def test_restart_trains_exactly_the_new_records(tmp_path, bootstrap, make_topic):
    topic = make_topic(4)
    first, second = 6_000, 4_000
    p = produce(bootstrap, topic, first)
    d = start(tmp_path, bootstrap, topic, "a")
    d.wait_trained(first, timeout=90)
    assert d.terminate()[0] == 0
    assert latest_meta(tmp_path / "snapshots")["samples"] == first

    produce(bootstrap, topic, second, seed=1, producer=p)
    d2 = start(tmp_path, bootstrap, topic, "b")
    d2.wait_trained(second, timeout=90)  # counters restart with the process; the snapshot keeps the total
    m = d2.settled()
    code, _ = d2.terminate()
    assert code == 0
    assert "resumed from snapshot" in d2.log()
    meta = latest_meta(tmp_path / "snapshots")
    assert meta["samples"] == first + second
    assert m["streamtrain_records_consumed_total"] == second, "the restart reads only what came after the snapshot"
    assert meta_positions(meta) == p.end


def test_garbage_goes_to_dead_letter_with_headers(tmp_path, bootstrap, make_topic):
    topic = make_topic(4)
    n, every = 10_000, 100  # 1 % garbage
    p = produce(bootstrap, topic, n, garbage_every=every)
    bad = len(range(every // 2, n, every))
    d = start(tmp_path, bootstrap, topic)
    d.wait_for(
        "every record handled",
        lambda m: m.get("streamtrain_samples_trained_total", 0) + m.get('streamtrain_records_rejected_total{reason="undecodable"}', 0) >= n,
        90,
    )
    # the ingest process reports its dead-letter acks with its next status (every 0.25 s): wait for the report, not the acks
    m = d.wait_for("the dead-letter acks reported", lambda m: m.get("streamtrain_dead_letter_records_total", 0) >= bad, 10)
    assert d.terminate()[0] == 0
    assert m['streamtrain_records_rejected_total{reason="undecodable"}'] == bad
    assert m["streamtrain_samples_trained_total"] == n - bad
    assert m["streamtrain_dead_letter_records_total"] == bad
    assert meta_positions(latest_meta(tmp_path / "snapshots")) == p.end

    letters = read_topic(bootstrap, f"{topic}.dlq", bad, timeout=30)
    assert len(letters) == bad
    seen = set()
    for msg in letters:
        h = {k: v.decode() for k, v in msg.headers()}
        assert h["streamtrain.source.topic"] == topic
        assert h["streamtrain.error.class"] == "undecodable"
        assert "JSON" in h["streamtrain.error.message"]
        assert msg.value().startswith(b"\x00garbage")
        seen.add((int(h["streamtrain.source.partition"]), int(h["streamtrain.source.offset"])))
    assert len(seen) == bad


def test_sigterm_mid_stream_final_snapshot_and_no_double_training(tmp_path, bootstrap, make_topic):
    topic = make_topic(4)
    n = 60_000
    p = produce(bootstrap, topic, n)
    d = start(tmp_path, bootstrap, topic, "a", ring={"batch_size": 64})
    d.wait_trained(5_000, timeout=60)
    code, took = d.terminate()
    assert code == 0 and took < 10, f"exit {code} after {took:.1f} s"
    assert "final snapshot" in d.log()
    done = latest_meta(tmp_path / "snapshots")["samples"]
    assert 5_000 <= done < n, "stopped mid-stream"

    d2 = start(tmp_path, bootstrap, topic, "b")
    d2.wait_trained(n - done, timeout=120)
    m = d2.settled()
    assert d2.terminate()[0] == 0
    assert m["streamtrain_records_consumed_total"] == n - done, "nothing read twice after the restart"
    meta = latest_meta(tmp_path / "snapshots")
    assert meta["samples"] == n
    assert meta_positions(meta) == p.end


def test_snapshot_directory_is_locked(tmp_path, bootstrap, make_topic):
    topic = make_topic(4)
    produce(bootstrap, topic, 100)
    d = start(tmp_path, bootstrap, topic, "a")
    d.wait_trained(100, timeout=60)
    second = start(tmp_path, bootstrap, topic, "b")
    assert second.wait_exit(60) == 3
    assert "in use by another streamtrain process" in second.log()
    assert d.proc.poll() is None, "the first daemon is undisturbed"
    assert d.terminate()[0] == 0


def test_warm_start_and_freeze(tmp_path, bootstrap, make_topic):
    """Transfer learning: load pretrained weights, freeze the body, fine-tune the head on the stream."""
    import torch

    from streamtrain.models.registry import build_model

    topic = make_topic(4)
    produce(bootstrap, topic, 3_000)
    pretrained = build_model("mlp", {"hidden": [32]}, 16)
    torch.save(pretrained.state_dict(), tmp_path / "pretrained.pt")
    d = start(
        tmp_path,
        bootstrap,
        topic,
        model={"init_weights": str(tmp_path / "pretrained.pt"), "freeze": ["net.0.*"]},
    )
    d.wait_trained(3_000, timeout=60)
    assert d.terminate()[0] == 0
    from streamtrain.daemon.snapshot import SnapshotStore

    _, state = SnapshotStore(tmp_path / "snapshots").load_latest()
    body = {k: v for k, v in state["model"].items() if k.startswith("net.0.")}
    head = {k: v for k, v in state["model"].items() if not k.startswith("net.0.")}
    assert body and head
    for k, v in body.items():  # (pretrained without the "was missing" marks: their weights start, and stay, at zero)
        old = pretrained.state_dict()[k]
        assert torch.equal(v[..., : old.shape[-1]], old) and not v[..., old.shape[-1] :].any(), f"{k} is frozen"
    assert any(not torch.equal(v, pretrained.state_dict()[k]) for k, v in head.items()), "the head trained"
    shutil.rmtree(tmp_path / "snapshots")


def test_the_demo_runs_and_the_daemon_stops_cleanly():
    """`make demo` is the README's first command: broker, producer, daemon, metrics, SIGTERM, a snapshot (shortened)."""
    import socket
    import subprocess
    import sys

    from tests.daemon_util import ROOT

    for port in (19092, 19100):  # the demo's fixed ports
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                pytest.skip(f"port {port} is in use")
    r = subprocess.run(
        [sys.executable, "demo/run_demo.py", "--seconds", "6", "--rate", "5000"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "==> daemon exited 0" in r.stdout and "newest: step" in r.stdout, r.stdout[-2000:]
    # the demo's window counts from the first trained sample: a slow start leaves it as long (it trained 0 in 1 of 8 runs)
    newest = re.search(r"newest: step (\d+), ([\d,]+) samples", r.stdout)
    assert newest and int(newest[1]) > 0 and int(newest[2].replace(",", "")) > 0, r.stdout[-2000:]


def test_the_join_demo_runs_and_joins(tmp_path):
    """`make demo-join`: impressions and their clicks on two topics, joined and trained (shortened)."""
    import socket
    import subprocess
    import sys

    from tests.daemon_util import ROOT

    for port in (19092, 19100):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                pytest.skip(f"port {port} is in use")
    r = subprocess.run([sys.executable, "demo/run_join_demo.py", "--seconds", "12"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "==> daemon exited 0" in r.stdout and "newest snapshot" in r.stdout, r.stdout[-2000:]
    rows = [line.split() for line in r.stdout.splitlines() if line.strip()[:1].isdigit() and len(line.split()) == 7]
    assert rows and float(rows[-1][2].replace(",", "")) > 0, r.stdout[-2000:]  # joined
