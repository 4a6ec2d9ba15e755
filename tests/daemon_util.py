"""Run the real daemon as a subprocess in tests, read its metrics, find its snapshots."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.kafka_util import free_port

ROOT = Path(__file__).resolve().parent.parent
FEATURES = [f"f{i}" for i in range(16)]


def daemon_config(tmp_path: Path, bootstrap: str, topics: list[str], **sections: dict[str, Any]) -> dict[str, Any]:
    """A config for a test daemon: the synthetic stream's JSON, a small MLP, a free metrics port."""
    cfg: dict[str, Any] = {
        "kafka": {"bootstrap_servers": bootstrap, "topics": topics, "group_id": f"g-{topics[0]}", "metadata_refresh_s": 1},
        "dead_letter": {"topic": f"{topics[0]}.dlq"},
        "data": {"format": "json", "features": FEATURES, "label": "y"},
        "ring": {"batch_size": 128, "slots": 4, "max_batch_wait_ms": 20},
        "model": {"name": "mlp", "params": {"hidden": [32]}},
        "trainer": {"lr": 0.003, "task": "regression"},
        "snapshot": {"dir": str(tmp_path / "snapshots"), "every_seconds": 1, "keep": 3},
        "metrics": {"host": "127.0.0.1", "port": free_port(span=4)},  # ranks serve on port + rank
        "logging": {"progress_every_s": 0, "level": "INFO"},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


class Daemon:
    """``python -m streamtrain run --config FILE`` with its log in a file.

    Every instance is registered so the ``daemons`` fixture can reap it after the test,
    whatever happened (a failed assertion must not leave a daemon running).
    """

    running: list[Daemon] = []

    def __init__(
        self,
        config_path: Path,
        log_path: Path,
        env: dict[str, str] | None = None,
        own_group: bool = False,
        ranks: int = 0,
        max_restarts: int = 0,
        launcher: str = "streamtrain",
    ) -> None:
        """``ranks``: that many ranks, each serving /metrics on port + rank, launched by ``streamtrain run --nproc-per-node``
        (``launcher="torchrun"``: by ``torchrun --standalone ... streamtrain run``, as users of torchrun do)."""
        self.config_path = config_path
        self.log_path = log_path
        self.cfg = yaml.safe_load(config_path.read_text())
        self.port = self.cfg["metrics"]["port"]
        self.ranks = ranks
        own_group = own_group or bool(ranks)  # reaped as a group: killing torchrun alone would orphan its ranks
        self._log = open(log_path, "ab")
        run = ["-m", "streamtrain", "run", "--config", str(config_path)]
        self.launcher = launcher if ranks else ""
        if ranks and launcher == "torchrun":
            torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", f"--max-restarts={max_restarts}"]
            run = [*torchrun, "--monitor-interval=0.5", *run]
        elif ranks:
            run = [*run, f"--nproc-per-node={ranks}", f"--max-restarts={max_restarts}"]
        self.proc = subprocess.Popen(
            [sys.executable, *run],
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            start_new_session=own_group,  # its own process group, to be signalled whole as systemd or a terminal does
        )
        self.own_group = own_group
        Daemon.running.append(self)

    @classmethod
    def reap_all(cls) -> None:
        while cls.running:
            d = cls.running.pop()
            if d.proc.poll() is None:
                d.proc.kill()
                d.proc.wait(10)
            if d.own_group:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(d.proc.pid, signal.SIGKILL)
            if not d._log.closed:
                d._log.close()

    # -------------------------------------------------------------- ranks (torchrun)
    def rank_pids(self) -> list[int]:
        """The processes torchrun started (one per rank; their ingest processes are theirs)."""
        try:
            return [int(p) for p in Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()]
        except OSError:
            return []

    def rank_metrics(self) -> list[dict[str, float]]:
        """Every rank's /metrics ({} for a rank not up)."""
        return [self.metrics(rank) for rank in range(max(1, self.ranks))]

    # -------------------------------------------------------------- reading
    def get(self, path: str, timeout: float = 2.0, rank: int = 0) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port + rank}{path}", timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except (OSError, http.client.HTTPException):  # not up (or not an HTTP answer): as if not listening
            return 0, ""

    def metrics(self, rank: int = 0) -> dict[str, float]:
        """Every sample as ``name{label="v",...}`` -> value (labels sorted); {} if not up."""
        code, text = self.get("/metrics", rank=rank)
        if code != 200:
            return {}
        return parse_metrics(text)

    def value(self, name: str, default: float = 0.0) -> float:
        return self.metrics().get(name, default)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    # -------------------------------------------------------------- waiting and stopping
    def wait_for(self, what: str, predicate: Callable[[dict[str, float]], bool], timeout: float) -> dict[str, float]:
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if m and predicate(m):
                return m
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited ({self.proc.returncode}) while waiting for {what}; log:\n{self.log()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout} s waiting for {what}; last metrics: {_brief(m)}; log:\n{self.log()[-3000:]}"
                )
            time.sleep(0.1)

    def settled(self, timeout: float = 10.0) -> dict[str, float]:
        """Metrics once the ingest process's last report covers every trained record.

        Its counters (consumed, rejected, pauses) come with a status it sends every 0.25 s, so
        they can trail the trainer's.  With one sample per record a report is current once
        records consumed >= samples trained + records rejected.
        """

        def caught_up(m: dict[str, float]) -> bool:
            rejected = sum(v for k, v in m.items() if k.startswith("streamtrain_records_rejected_total"))
            return m.get("streamtrain_records_consumed_total", 0) >= m.get("streamtrain_samples_trained_total", 0) + rejected

        return self.wait_for("the ingest process's counters to catch up", caught_up, timeout)

    def wait_trained(self, n: int, timeout: float = 60.0) -> dict[str, float]:
        return self.wait_for(f"{n} samples trained", lambda m: m.get("streamtrain_samples_trained_total", 0) >= n, timeout)

    def terminate(self, timeout: float = 20.0) -> tuple[int, float]:
        """SIGTERM; returns (exit code, seconds it took)."""
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"daemon did not stop within {timeout} s of SIGTERM; log:\n{self.log()[-3000:]}") from None
        finally:
            self._log.close()
        return code, time.monotonic() - t0

    def signal_group(self, sig: int) -> None:
        """Send ``sig`` to the daemon's whole process group (the ingest child too), as ``kill -SIG -- -PGID``."""
        assert self.own_group, "start the daemon with own_group=True"
        os.killpg(self.proc.pid, sig)

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        self._log.close()

    def kill9_rank(self, index: int) -> int:
        """kill -9 one rank (torchrun sees it fail, stops the others, and restarts the group); returns its pid."""
        pid = self.rank_pids()[index]
        os.kill(pid, signal.SIGKILL)
        return pid

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()


def parse_metrics(text: str) -> dict[str, float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def _brief(m: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in m.items() if k.startswith(("streamtrain_samples", "streamtrain_records", "streamtrain_steps_total"))}


def snapshots(directory: Path) -> list[Path]:
    return sorted(p for p in Path(directory).glob("snap-*") if (p / "MANIFEST.json").exists())


def latest_meta(directory: Path) -> dict[str, Any]:
    snaps = snapshots(directory)
    assert snaps, f"no complete snapshot in {directory}"
    return json.loads((snaps[-1] / "meta.json").read_text())


def meta_positions(meta: dict[str, Any]) -> dict[tuple[str, int], int]:
    return {(t, p): o for t, p, o, _rows in meta["positions"]}


def run_cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamtrain", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
