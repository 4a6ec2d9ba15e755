"""The systemd notify protocol over a real unix datagram socket: the client alone, and the live daemon."""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from streamtrain.daemon.notify import Heartbeat, Notifier
from tests.daemon_util import Daemon, daemon_config, write_config
from tests.test_daemon import produce


class Listener:
    """What systemd does with $NOTIFY_SOCKET: a bound AF_UNIX datagram socket; records each message."""

    def __init__(self, address: str) -> None:
        self.address = address  # a path, or @name for the abstract namespace
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(b"\0" + address[1:].encode() if address.startswith("@") else address)
        self.messages: list[tuple[float, dict[str, str]]] = []

    def recv(self, timeout: float) -> dict[str, str] | None:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return None
        fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
        self.messages.append((time.monotonic(), fields))
        return fields

    def wait_for(self, key: str, timeout: float, daemon: Daemon | None = None) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            msg = self.recv(min(left, 0.5))
            if msg is not None and key in msg:
                return msg
            if daemon is not None and daemon.proc.poll() is not None:
                raise AssertionError(f"daemon exited ({daemon.proc.returncode}) before {key}; log:\n{daemon.log()[-3000:]}")
        got = [m for _, m in self.messages][-10:]
        raise AssertionError(f"no {key} within {timeout} s; last messages: {got}")

    def drain(self, seconds: float) -> list[dict[str, str]]:
        end = time.monotonic() + seconds
        out = []
        while (left := end - time.monotonic()) > 0:
            msg = self.recv(left)
            if msg is not None:
                out.append(msg)
        return out

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def sock_dir(tmp_path):
    """A directory for the socket; a short one when tmp_path would pass the 107-byte sun_path limit."""
    if len(str(tmp_path / "notify.sock")) < 100:
        yield tmp_path
        return
    with tempfile.TemporaryDirectory(prefix="st-") as d:
        yield Path(d)


@pytest.fixture
def listener(sock_dir):
    lst = Listener(str(sock_dir / "notify.sock"))
    yield lst
    lst.close()


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_messages_arrive_on_a_socket_path(listener):
    n = Notifier(listener.address)
    assert n.enabled
    assert n.ready("step 0, loading")
    assert listener.recv(2) == {"READY": "1", "STATUS": "step 0, loading"}
    assert n.status("two\nlines  here")
    assert listener.recv(2) == {"STATUS": "two lines here"}, "a status is one line: a newline would start a new field"
    assert n.stopping("final snapshot")
    assert listener.recv(2) == {"STOPPING": "1", "STATUS": "final snapshot"}
    n.close()


def test_abstract_namespace_socket():
    lst = Listener(f"@streamtrain-test-{uuid.uuid4().hex}")
    try:
        n = Notifier.from_env({"NOTIFY_SOCKET": lst.address})
        assert n.ready()
        assert lst.recv(2) == {"READY": "1"}
    finally:
        lst.close()


def test_watchdog_is_rate_limited_to_half_the_interval(listener):
    clock = FakeClock()
    n = Notifier(listener.address, watchdog_usec=2_000_000, clock=clock)
    assert n.watchdog_interval == 1.0
    sent = []
    for _ in range(30):  # 3 s of loop turns every 0.1 s
        sent.append(n.watchdog())
        clock.now += 0.1
    assert sum(sent) == 3, sent
    got = listener.drain(0.3)
    assert got == [{"WATCHDOG": "1"}] * 3


def test_environment_is_read_as_systemd_sets_it(listener):
    assert not Notifier.from_env({}).enabled
    quiet = Notifier.from_env({})
    assert not any((quiet.ready(), quiet.status("x"), quiet.watchdog(), quiet.stopping())), "a no-op without NOTIFY_SOCKET"
    env = {"NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": "3000000"}
    assert Notifier.from_env(env).watchdog_interval == 1.5
    assert Notifier.from_env({**env, "WATCHDOG_PID": str(os.getpid())}).watchdog_interval == 1.5
    assert Notifier.from_env({**env, "WATCHDOG_PID": "1"}).watchdog_interval == 0, "the watchdog is for another process"
    assert Notifier.from_env({**env, "WATCHDOG_USEC": "soon"}).watchdog_interval == 0
    assert Notifier.from_env({"WATCHDOG_USEC": "3000000"}).watchdog_interval == 0, "no socket, no pings"
    assert not Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled, "unsupported address kinds are left alone"


def test_a_missing_socket_never_raises(sock_dir, caplog):
    n = Notifier(str(sock_dir / "nobody-listens.sock"), watchdog_usec=1_000_000)
    assert n.ready() is False
    assert n.watchdog() is False
    assert n.status("x") is False
    assert sum("cannot notify" in r.getMessage() for r in caplog.records) == 1, "warned once, not per message"


def test_heartbeat_sends_ready_once_then_status_and_pings_only_while_alive(listener):
    clock = FakeClock()
    n = Notifier(listener.address, watchdog_usec=1_000_000, clock=clock)
    state = {"ready": False, "alive": True, "beats": 0}

    def beat():
        state["beats"] += 1

    hb = Heartbeat(
        n,
        beat,
        ready=lambda: (state["ready"], {"model": "loaded", "kafka": "connecting to k:9092"}),
        alive=lambda: (state["alive"], {"trainer": "ok"}),
        status=lambda: f"step {state['beats']}",
        status_every_s=2.0,
        clock=clock,
    )

    def run(seconds: float) -> list[dict[str, str]]:
        for _ in range(int(seconds / 0.05)):  # a loop turn every 50 ms
            hb()
            clock.now += 0.05
        return listener.drain(0.2)

    got = run(1.0)
    assert state["beats"] == 20, "the /healthz heartbeat beats on every turn"
    assert {"STATUS": "starting: model: loaded, kafka: connecting to k:9092"} in got
    assert not any("READY" in m for m in got)
    assert sum("WATCHDOG" in m for m in got) == 2

    state["ready"] = True
    got = run(5.0)
    ready = [m for m in got if "READY" in m]
    assert len(ready) == 1 and ready[0]["STATUS"].startswith("step "), got
    assert 2 <= sum("STATUS" in m and "READY" not in m for m in got) <= 3, "a status line every 2 s"
    assert 7 <= sum("WATCHDOG" in m for m in got) <= 10, "a ping every 0.5 s (0.6 s at most: the tick is 0.1 s)"

    state["alive"] = False
    got = run(2.0)
    assert not any("WATCHDOG" in m for m in got), "no pings while /healthz would fail: systemd restarts it"


def test_a_failing_status_line_costs_neither_ready_nor_training(listener):
    n = Notifier(listener.address)
    hb = Heartbeat(n, lambda: None, ready=lambda: (True, {}), alive=lambda: (True, {}), status=lambda: 1 / 0)
    hb()  # must not raise into the training loop
    assert listener.recv(2) == {"READY": "1"}


@pytest.mark.integration
def test_daemon_speaks_the_notify_protocol(tmp_path, bootstrap, make_topic, listener):
    topic = make_topic(4)
    produce(bootstrap, topic, 2_000)
    cfg = daemon_config(tmp_path, bootstrap, [topic])
    env = {"NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": "1000000"}  # a ping every 0.5 s
    d = Daemon(write_config(tmp_path / "d.yaml", cfg), tmp_path / "d.log", env=env)

    ready = listener.wait_for("READY", 60, d)
    code, body = d.get("/readyz")
    assert code == 200, f"READY=1 before /readyz is ready: {body}"
    assert json.loads(body)["checks"]["kafka"] == "4 partition(s) assigned"
    assert ready["STATUS"].startswith("step "), ready
    before = [m for _, m in listener.messages[:-1]]
    assert any(m.get("STATUS", "").startswith("starting") for m in before), before

    d.wait_trained(2_000, timeout=60)
    got = listener.drain(6.0)
    pings = sum("WATCHDOG" in m for m in got)
    assert 8 <= pings <= 14, f"WATCHDOG=1 about every 0.5 s, got {pings} in 6 s"
    statuses = [m["STATUS"] for m in got if "STATUS" in m]
    assert statuses and all("\n" not in s for s in statuses)
    assert any("2,000 samples" in s and "lag 0" in s for s in statuses), statuses

    d.proc.send_signal(15)
    stopping = listener.wait_for("STOPPING", 20, d)
    assert stopping["STATUS"] == "stopping: final snapshot and commit"
    assert d.wait_exit(30) == 0, d.log()[-3000:]
