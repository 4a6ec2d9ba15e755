"""The systemd notify protocol, spoken directly over ``$NOTIFY_SOCKET`` (no libsystemd, no new dependency).

Under ``Type=notify`` systemd waits for ``READY=1`` before it calls the service started,
restarts it when ``WATCHDOG=1`` stops arriving for ``WatchdogSec=``, shows the last
``STATUS=`` line in ``systemctl status``, and starts the stop timeout on ``STOPPING=1``.
The daemon sends READY once the model is loaded and its partitions are assigned, pings
the watchdog from the training loop (a stuck trainer stops the pings), and keeps a
one-line status current.  Without ``$NOTIFY_SOCKET`` (a terminal, Docker) every call is a
no-op.  See sd_notify(3) for the protocol.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

log = logging.getLogger("streamtrain.notify")


class Notifier:
    """Sends notify-protocol messages to the service manager; never raises, never blocks.

    ``address`` is a socket path, or ``@name`` for the Linux abstract namespace.
    ``watchdog_usec`` is systemd's ``WATCHDOG_USEC``: pings go out at most every half of it.
    """

    def __init__(self, address: str | None, watchdog_usec: int = 0, clock: Callable[[], float] = time.monotonic) -> None:
        self.address = _sockaddr(address) if address else None
        self.watchdog_interval = watchdog_usec / 2e6 if watchdog_usec > 0 and self.address else 0.0
        self.clock = clock
        self._next_ping = 0.0
        self._sock: socket.socket | None = None
        self._warned = False
        self.sent = 0  # messages delivered (tests and logs)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Notifier:
        """Read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` as sd_notify(3) and sd_watchdog_enabled(3) do."""
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET") or None
        if address and not address.startswith(("/", "@")):
            log.warning("NOTIFY_SOCKET=%s: only unix socket paths and @abstract names are supported; not notifying", address)
            address = None
        usec = 0
        if env.get("WATCHDOG_USEC"):
            try:
                usec = int(env["WATCHDOG_USEC"])
            except ValueError:
                log.warning("WATCHDOG_USEC=%r is not a number of microseconds; the watchdog is not pinged", env["WATCHDOG_USEC"])
            pid = env.get("WATCHDOG_PID")
            if pid and pid != str(os.getpid()):
                usec = 0  # the watchdog is meant for another process (ours was started by it)
        return cls(address, usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """One datagram of ``KEY=value`` lines; False when there is no socket or it failed (logged once)."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)  # a full manager queue drops a message; the loop never waits
            self._sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("cannot notify the service manager at %s: %s (further failures are not logged)", _show(self.address), exc)
            return False
        self.sent += 1
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *_status(status))

    def status(self, text: str) -> bool:
        return self.send(*_status(text))

    def stopping(self, status: str | None = None) -> bool:
        return self.send("STOPPING=1", *_status(status))

    def watchdog_due(self) -> bool:
        return bool(self.watchdog_interval) and self.clock() >= self._next_ping

    def watchdog(self) -> bool:
        """``WATCHDOG=1``, at most once per half ``WATCHDOG_USEC``; cheap to call on every loop turn."""
        if not self.watchdog_due():
            return False
        self._next_ping = self.clock() + self.watchdog_interval
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class Heartbeat:
    """The training loop's heartbeat with the notify protocol folded in.

    Called on every turn of the loop: ``beat()`` (the /healthz heartbeat) always; then, at
    most every ``tick_s``, READY=1 the first time ``ready()`` says so, WATCHDOG=1 while
    ``alive()`` says so (what /healthz answers: a stuck trainer never gets here, a dead
    ingest thread fails ``alive``), and a STATUS= line every ``status_every_s``.
    """

    def __init__(
        self,
        notifier: Notifier,
        beat: Callable[[], None],
        ready: Callable[[], tuple[bool, Mapping[str, str]]],
        alive: Callable[[], tuple[bool, Mapping[str, str]]],
        status: Callable[[], str],
        status_every_s: float = 5.0,
        tick_s: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.notifier = notifier
        self.beat = beat
        self.ready_check = ready
        self.alive_check = alive
        self.status_line = status
        self.status_every_s = status_every_s
        self.tick_s = min(tick_s, notifier.watchdog_interval / 5 or tick_s)  # pings stay within 1.2x their interval
        self.clock = clock
        self.is_ready = False
        self._next_tick = 0.0
        self._next_status = 0.0
        self._failing = False

    def __call__(self) -> None:
        self.beat()
        now = self.clock()
        if now < self._next_tick:
            return
        self._next_tick = now + self.tick_s
        try:
            self._tick(now)
        except Exception:  # never let a status line break training
            log.debug("notify heartbeat failed", exc_info=True)

    def _tick(self, now: float) -> None:
        if self.notifier.watchdog_due():
            alive, detail = self.alive_check()
            if alive:
                self.notifier.watchdog()
            elif not self._failing:
                log.warning("not pinging the systemd watchdog while unhealthy: %s", _join(detail))
            self._failing = not alive
        if not self.is_ready:
            ok, detail = self.ready_check()
            if ok:
                self.is_ready = True
                self._next_status = now + self.status_every_s
                self.notifier.ready(self._line())
                log.info("ready: told the service manager (READY=1)")
            elif now >= self._next_status:
                self._next_status = now + self.status_every_s
                self.notifier.status(f"starting: {_join(detail)}")
        elif now >= self._next_status:
            self._next_status = now + self.status_every_s
            line = self._line()
            if line is not None:
                self.notifier.status(line)

    def _line(self) -> str | None:
        try:
            return self.status_line()
        except Exception:  # a status line must never cost the READY=1 or break training
            log.debug("status line failed", exc_info=True)
            return None


def _sockaddr(address: str) -> str | bytes:
    return b"\0" + address[1:].encode() if address.startswith("@") else address


def _show(address: str | bytes) -> str:
    return "@" + address[1:].decode(errors="replace") if isinstance(address, bytes) else address


def _status(text: str | None) -> list[str]:
    return [] if text is None else ["STATUS=" + " ".join(text.split())]  # one line: newlines would start new fields


def _join(detail: Mapping[str, str]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in detail.items())
