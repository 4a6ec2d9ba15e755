"""HTTP for the serving benchmark and tests: ``streamtrain serve`` as a process, and a keep-alive client."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from demo.broker import free_port

ROOT = Path(__file__).resolve().parent.parent


class Client:
    """One keep-alive HTTP/1.1 connection (as a load generator's thread holds); reconnects when the server closed it."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.port = port
        self.timeout = timeout
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)

    def request(self, method: str, path: str, body: Any = None, raw: bytes | None = None, headers: dict | None = None) -> tuple[int, Any]:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        headers = {**({"Content-Type": "application/json"} if data is not None else {}), **(headers or {})}
        for attempt in (0, 1):
            try:
                self.conn.request(method, path, body=data, headers=headers)
                r = self.conn.getresponse()
                text = r.read()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.conn.close()  # an idle keep-alive connection the server timed out: once more on a new one
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
                if attempt:
                    raise
        ctype = r.getheader("Content-Type", "")
        if ctype.startswith("application/json"):
            return r.status, json.loads(text)
        binary = ctype.startswith("application/octet-stream") or r.getheader("Inference-Header-Content-Length") is not None
        return r.status, text if binary else text.decode()  # v2's binary tensors: bytes (kserve gives them no octet-stream type)

    def post(self, path: str, body: Any = None, raw: bytes | None = None) -> tuple[int, Any]:
        return self.request("POST", path, body, raw)

    def get(self, path: str) -> tuple[int, Any]:
        return self.request("GET", path)

    def close(self) -> None:
        self.conn.close()


class ServeProcess:
    """``python -m streamtrain serve ...`` with its log in a file."""

    def __init__(self, log_path: Path, *args: str) -> None:
        self.port = free_port()
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streamtrain", "serve", "--port", str(self.port), *args],
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def wait_ready(self, timeout: float = 60.0, path: str = "/readyz", every: float = 0.1) -> float:
        """Seconds from the process's start until ``path`` answered 200 (``/v2/health/ready``: both servers have it)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                c = Client(self.port, timeout=2)
                code, _ = c.get(path)
                c.close()
                if code == 200:
                    return time.monotonic() - self.started
            except OSError:
                pass
            assert self.proc.poll() is None, f"streamtrain serve exited ({self.proc.returncode}):\n{self.log()[-3000:]}"
            assert time.monotonic() < deadline, f"streamtrain serve not ready after {timeout} s:\n{self.log()[-3000:]}"
            time.sleep(every)

    def rss_mib(self) -> float:
        """The server process's resident memory now (VmRSS), MiB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 20.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
            self._log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if not self._log.closed:
            self._log.close()
