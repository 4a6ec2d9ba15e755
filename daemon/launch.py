"""``streamtrain run --nproc-per-node N``: the ranks launched by ``torch.distributed.run`` from this process.

This process becomes the elastic agent ``torchrun`` would be (``torch.distributed.run.run``,
with torchrun's own arguments: rendezvous, ``--max-restarts``, ``--nnodes MIN:MAX``), and
starts each rank as ``python -m streamtrain run --config F`` with the same ``--set``
overrides.  What it adds is the exit status a service manager can trust:

- a stop (SIGTERM, SIGINT, SIGHUP, SIGQUIT to this process, or to the whole group as
  systemd's ``KillMode=control-group`` sends it) reaches every rank; each stops at the same
  step, rank 0 writes the final snapshot, and each rank reports its exit status here.  When
  every rank of this host's last attempt stopped with 0, this process exits **0**.  torchrun
  re-raises the signal and exits 1 after the same clean stop, which is why a unit running
  torchrun had to count exit 1 as success -- and then a real failure too.
- a rank that fails once the restarts (``--max-restarts``) are spent: the exit status of the
  first failure (1 a runtime error, 2 a bad config, 3 a locked snapshot directory; 1 for a
  rank killed by a signal), and the log names the rank, its host and its exit.
- a rank that did not finish its stop before the agent's grace period (30 s) ran out, and
  was killed: exit 1, naming it.

The ranks report through files in a private directory (``STREAMTRAIN_LAUNCH_DIR``), one
per rank and restart attempt, written when the rank starts and again with its exit status
(``daemon/service.py``); a rank whose collective broke says so, its failure being another
rank's.  ``torchrun ... --no-python streamtrain run --config F`` still works as before:
without this variable nothing is written.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import socket
import sys
import tempfile
from pathlib import Path

log = logging.getLogger("streamtrain.launch")

ENV = "STREAMTRAIN_LAUNCH_DIR"
EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2

# streamtrain run's options that are torchrun's, passed through as they are
PASSED = (
    ("--nproc-per-node", "ranks on this host (torchrun's --nproc-per-node); launching them makes this process the elastic agent"),
    ("--nnodes", "hosts, N or MIN:MAX for an elastic group (torchrun's --nnodes; default 1)"),
    ("--node-rank", "this host's rank with the static rendezvous (torchrun's --node-rank)"),
    ("--rdzv-backend", "rendezvous backend (torchrun's; default c10d with --rdzv-endpoint, else static)"),
    ("--rdzv-endpoint", "HOST:PORT where the hosts meet (torchrun's --rdzv-endpoint)"),
    ("--rdzv-id", "the group's id: the same on every host (torchrun's --rdzv-id)"),
    ("--max-restarts", "how many times a failed group is started again, from the last snapshot (torchrun's; default 0)"),
    ("--local-addr", "the address other hosts reach this one at (torchrun's --local-addr; default: the host name)"),
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("several ranks (torch.distributed.run, as torchrun)")
    for flag, text in PASSED:
        g.add_argument(flag, help=text)


def requested(args: argparse.Namespace) -> bool:
    return any(getattr(args, _dest(flag)) is not None for flag, _ in PASSED)


def launch(args: argparse.Namespace, cfg: object) -> int:
    """Run the ranks with ``torch.distributed.run`` until they stop; this process's exit status."""
    from streamtrain.streams.logs import setup_logging

    setup_logging(cfg.logging.level, cfg.logging.format)
    if os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("RANK"):
        log.error("already a rank (RANK or TORCHELASTIC_RUN_ID is set): launch with torchrun or with --nproc-per-node, not both")
        return EXIT_CONFIG
    launcher = [f"{flag}={getattr(args, _dest(flag))}" for flag, _ in PASSED if getattr(args, _dest(flag)) is not None]
    if args.nproc_per_node is None:
        launcher.append("--nproc-per-node=1")
    rank_args = ["run", "--config", args.config, *(a for o in args.overrides for a in ("--set", o))]
    with tempfile.TemporaryDirectory(prefix="streamtrain-launch-") as reports:
        os.environ[ENV] = reports
        try:
            return _run(launcher, rank_args, Path(reports))
        finally:
            os.environ.pop(ENV, None)


def _run(launcher: list[str], rank_args: list[str], reports: Path) -> int:
    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        targs = torchrun.parse_args([*launcher, "--module", "streamtrain", *rank_args])
    except SystemExit as exc:  # argparse said why on stderr
        return EXIT_CONFIG if exc.code else EXIT_OK
    nproc = int(targs.nproc_per_node)
    log.info("launching %d rank(s) on %s (nnodes %s, max restarts %d)", nproc, socket.gethostname(), targs.nnodes, targs.max_restarts)
    try:
        torchrun.run(targs)
    except SignalException as exc:
        return _after_stop(reports, nproc, exc.sigval.name if hasattr(exc.sigval, "name") else str(exc.sigval))
    except ChildFailedError as exc:
        return _failed(exc, reports)
    log.info("every rank stopped with 0")
    return EXIT_OK


def _after_stop(reports: Path, nproc: int, signame: str) -> int:
    """After a stop signal: 0 when every rank of this host's last attempt reported a clean stop."""
    latest = _latest(reports)
    if not latest:
        log.error("%s: no rank had started; nothing to stop", signame)
        return EXIT_FAILURE
    attempt = next(iter(latest))[0]
    last = {rank: status for (_, rank), (status, _) in latest.items()}
    bad = {rank: status.split()[0] for rank, status in last.items() if status != "0"}
    missing = nproc - len(last)
    if not bad and missing == 0:
        log.info("%s: every rank of this host (%d) stopped cleanly, the final snapshot written by rank 0", signame, nproc)
        return EXIT_OK
    for rank, status in sorted(bad.items()):
        if status == "started":
            log.error("%s: rank %d did not finish its stop (killed after the grace period, or died)", signame, rank)
        else:
            log.error("%s: rank %d stopped with exit %s", signame, rank, status)
    if missing:
        log.error("%s: %d rank(s) of attempt %d never started", signame, missing, attempt)
    return EXIT_FAILURE


def _failed(exc: object, reports: Path) -> int:
    """The status of the rank that failed first: its own report's time says which (the others' collectives then failed)."""
    for r, f in sorted(exc.failures.items()):
        how = f"killed by signal {f.signal_name()}" if f.exitcode < 0 else f"exit {f.exitcode}"
        log.error("rank %d (local rank %d on %s, pid %d) failed: %s", r, f.local_rank, socket.gethostname(), f.pid, how)
    log.error("the group failed and its restarts are spent; the last durable snapshot is kept")
    exits = sorted(
        (mtime, rank, int(status)) for (_, rank), (status, mtime) in _latest(reports).items() if status.isdigit() and status != "0"
    )
    if exits:
        _, rank, code = exits[0]
        log.error("rank %d failed first (exit %d)", rank, code)
        return code
    _, failure = exc.get_first_failure()  # no rank reported: killed before it could
    return failure.exitcode if failure.exitcode > 0 else EXIT_FAILURE


_REPORT = re.compile(r"^attempt-(\d+)-rank-(\d+)$")


def read_reports(reports: Path) -> dict[tuple[int, int], tuple[str, int]]:
    """``{(attempt, rank): ("started" | exit status, when written in ns)}`` from the ranks' report files."""
    out = {}
    for path in reports.iterdir():
        m = _REPORT.match(path.name)
        if m:
            out[int(m[1]), int(m[2])] = (path.read_text().strip() or "started", path.stat().st_mtime_ns)
    return out


def _latest(reports: Path) -> dict[tuple[int, int], tuple[str, int]]:
    """The reports of the last attempt (restart) that any rank reported from."""
    seen = read_reports(reports)
    last = max((a for a, _ in seen), default=0)
    return {k: v for k, v in seen.items() if k[0] == last}


def report(rank: int, status: str) -> None:
    """A rank's report (``started`` or its exit status) to the launcher, when there is one."""
    where = os.environ.get(ENV)
    if not where:
        return
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    path = Path(where) / f"attempt-{attempt}-rank-{rank}"
    try:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(f"{status}\n")
        os.replace(tmp, path)
    except OSError as exc:  # the launcher then counts this rank as not stopped cleanly
        print(f"streamtrain: could not report to the launcher at {where}: {exc}", file=sys.stderr)


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")
