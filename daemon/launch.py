"""``streamtrain run --nproc-per-node N``: the ranks launched by ``torch.distributed.run`` from this process.

This process becomes the elastic agent ``torchrun`` would be (``torch.distributed.run.run``,
with torchrun's own arguments: rendezvous, ``--max-restarts``, ``--nnodes MIN:MAX``), and
starts each rank as ``python -m streamtrain run --config F`` with the same ``--set``
overrides.  What it adds is the exit status a service manager can trust:

- a stop (SIGTERM, SIGINT, SIGHUP, SIGQUIT to this process, or to the whole group as
  systemd's ``KillMode=control-group`` sends it) reaches every rank; each stops at the same
  step, rank 0 writes the final snapshot, and each rank reports its exit status here.  When
  every rank this host runs stopped with 0, this process exits **0**.  torchrun
  re-raises the signal and exits 1 after the same clean stop, which is why a unit running
  torchrun had to count exit 1 as success -- and then a real failure too.
- a rank that fails once the restarts (``--max-restarts``) are spent: the exit status of the
  first failure (1 a runtime error, 2 a bad config, 3 a locked snapshot directory; 1 for a
  rank killed by a signal), and the log names the rank, its host and its exit.
- a rank that did not finish its stop before the agent's grace period (30 s) ran out, and
  was killed: exit 1, naming it.

The ranks report through files in a private directory (``STREAMTRAIN_LAUNCH_DIR``), one
per local rank (each restart's process overwrites it), written when the rank starts and again with its exit status
(``daemon/service.py``); a rank whose collective broke says so, its failure being another
rank's.  ``torchrun ... --no-python streamtrain run --config F`` still works as before:
without this variable nothing is written.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("streamtrain.launch")

ENV = "STREAMTRAIN_LAUNCH_DIR"
EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2

# streamtrain run's options that are torchrun's, passed through as they are
PASSED = (
    ("--nproc-per-node", "ranks on this host (torchrun's --nproc-per-node); launching them makes this process the elastic agent"),
    ("--nnodes", "hosts, N or MIN:MAX for an elastic group (torchrun's --nnodes; default 1)"),
    ("--node-rank", "this host's rank with the static rendezvous (torchrun's --node-rank)"),
    ("--rdzv-backend", "rendezvous backend (torchrun's; default c10d with --rdzv-endpoint and no --node-rank, else static)"),
    ("--rdzv-endpoint", "HOST:PORT where the hosts meet (torchrun's --rdzv-endpoint)"),
    ("--rdzv-id", "the group's id: the same on every host (torchrun's --rdzv-id)"),
    ("--rdzv-conf", "rendezvous settings, KEY=VALUE,... (torchrun's --rdzv-conf: join_timeout, is_host, ...)"),
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
    if args.rdzv_endpoint and args.rdzv_backend is None and args.node_rank is None:
        launcher.append("--rdzv-backend=c10d")  # torchrun's default, static, would make every host node 0 without --node-rank
    rank_args = ["run", "--config", args.config, *(a for o in args.overrides for a in ("--set", o))]
    # A host that comes back (a new agent) after a restart waits forever for the rendezvous's MASTER_ADDR when the
    # agents share one TCP store: rank 0's agent wrote it in the first round only (torch 2.13's dynamic_rendezvous
    # caches it; seen in tests/test_hosts.py).  Without sharing, every round writes its own; rank 0 hosts the ranks' store.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
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

    def stop_before_the_ranks(signum: int, _frame: object) -> None:  # torch's own handlers take over once the ranks start
        raise SignalException(f"Process {os.getpid()} got signal: {signum}", sigval=signal.Signals(signum))

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, stop_before_the_ranks)
    try:
        torchrun.run(targs)
    except SignalException as exc:
        return _after_stop(reports, nproc, exc.sigval.name if hasattr(exc.sigval, "name") else str(exc.sigval))
    except ChildFailedError as exc:
        return _failed(exc, reports)
    log.info("every rank stopped with 0")
    return EXIT_OK


def _after_stop(reports: Path, nproc: int, signame: str) -> int:
    """After a stop signal: 0 when every rank this host runs reported a clean stop."""
    last = read_reports(reports)
    if not last:
        log.info("%s while no rank was running (waiting at the rendezvous): nothing to stop", signame)
        return EXIT_OK
    bad = {local: r for local, r in last.items() if r.status != "0"}
    missing = [local for local in range(nproc) if local not in last]
    if not bad and not missing:
        log.info("%s: every rank of this host (%d) stopped cleanly, the final snapshot written by rank 0", signame, nproc)
        return EXIT_OK
    for local, r in sorted(bad.items()):
        if r.status == "started":
            log.error(
                "%s: rank %d (local rank %d) did not finish its stop (killed after the grace period, or died)", signame, r.rank, local
            )
        else:
            log.error("%s: rank %d (local rank %d) stopped with exit %s", signame, r.rank, local, r.status)
    if missing:
        log.error("%s: local rank(s) %s never started", signame, ", ".join(map(str, missing)))
    return EXIT_FAILURE


def _failed(exc: object, reports: Path) -> int:
    """The status of the rank that failed first, its own failure, not a collective that broke under it (``1 peer``)."""
    for r, f in sorted(exc.failures.items()):
        how = f"killed by signal {f.signal_name()}" if f.exitcode < 0 else f"exit {f.exitcode}"
        log.error("rank %d (local rank %d on %s, pid %d) failed: %s", r, f.local_rank, socket.gethostname(), f.pid, how)
    log.error("the group failed and its restarts are spent; the last durable snapshot is kept")
    exits = sorted(
        (r.peer, r.written_ns, r.rank, int(r.status)) for r in read_reports(reports).values() if r.status not in ("0", "started")
    )
    if exits:
        _, _, rank, code = exits[0]
        log.error("rank %d failed first (exit %d)", rank, code)
        return code
    _, failure = exc.get_first_failure()  # no rank reported: killed before it could
    return failure.exitcode if failure.exitcode > 0 else EXIT_FAILURE


@dataclass(frozen=True)
class Report:
    status: str  # "started", or the exit status
    rank: int  # the global rank it ran as (it can change between restarts: elastic membership)
    peer: bool  # its failure was a collective that broke under it: another rank's
    written_ns: int


def read_reports(reports: Path) -> dict[int, Report]:
    """``{local rank: its newest report}``: each rank's process overwrites its local rank's file, restart after restart."""
    out = {}
    for path in reports.glob("local-*"):
        if path.suffix == ".tmp":
            continue
        try:
            status, rank, peer = path.read_text().split()
            out[int(path.name.removeprefix("local-"))] = Report(status, int(rank), peer == "peer", path.stat().st_mtime_ns)
        except (OSError, ValueError):
            continue
    return out


def report(rank: int, status: str, peer: bool = False) -> None:
    """A rank's report (``started`` or its exit status) to the launcher, when there is one."""
    where = os.environ.get(ENV)
    if not where:
        return
    path = Path(where) / f"local-{os.environ.get('LOCAL_RANK', '0')}"
    try:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(f"{status} {rank} {'peer' if peer else '-'}\n")
        os.replace(tmp, path)
    except OSError as exc:  # the launcher then counts this rank as not stopped cleanly
        print(f"streamtrain: could not report to the launcher at {where}: {exc}", file=sys.stderr)


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")
