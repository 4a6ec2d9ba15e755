"""Several ranks: the daemon launched by ``torchrun``, one process per rank, data-parallel.

``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (and where to meet:
``MASTER_ADDR``/``MASTER_PORT``); without them, or with ``WORLD_SIZE=1``, the daemon is
the single process it always was and nothing here runs.

With several, each rank reads its own partitions (``streams/split.py``) and trains a
replica of the model.  Every turn of the loop is one global decision, taken by two
collectives over the ranks (gloo on the CPU, nccl on CUDA):

1. :meth:`World.control`, one small all-reduce of float64 numbers: this rank's sample
   count, its flags (stop, snapshot now, snapshot asked for) and the sums of its batch's
   features and labels (centred on the running means, which every rank holds alike),
   from which every rank folds the same statistics into its standardizers.
2. In the step, one all-reduce of the gradients (of each rank's summed loss divided by
   the global sample count) together with the prequential sums, so a step over the ranks
   is one step over the union of their batches, and every decision taken from it -- a
   skipped non-finite step, clipping, the LR schedule, a drift action, a roll-back -- is
   taken alike on every rank.

A rank with nothing this turn takes part with zeros.  Snapshots are rank 0's alone: it
gathers every rank's positions at a step they all agreed on (:meth:`World.gather`),
checks that every partition read by any rank is in them, writes one snapshot and
commits; restoring, rank 0 reads it and sends it to the others (:meth:`World.broadcast`),
so other hosts need no shared disk.  A rank that dies makes every collective fail on the
others: they exit 1 and ``torchrun --max-restarts`` starts the group again, from the
snapshot.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from streamtrain.daemon.errors import ConfigError, RankError

log = logging.getLogger("streamtrain.ranks")

# control vector: [samples, stop, snapshot now (rank 0), snapshot asked for, then the moments]
_SAMPLES, _STOP, _SNAPSHOT, _ASKED = range(4)
_HEAD = 4


@dataclass(frozen=True)
class World:
    """This process's place among the ranks; ``size == 1`` is the one-process daemon."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1  # ranks on this host

    @property
    def ranked(self) -> bool:
        return self.size > 1

    @property
    def leader(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> World:
        """From torchrun's ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (``LOCAL_WORLD_SIZE``); one rank when they are not set."""
        problems, values = [], {}
        for name, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0), ("LOCAL_WORLD_SIZE", 1)):
            raw = environ.get(name)
            try:
                values[name] = default if raw is None else int(raw)
            except ValueError:
                problems.append(f"{name}={raw!r} in the environment is not an integer (torchrun sets it)")
        if problems:
            raise ConfigError(problems)
        world = cls(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"], max(1, values["LOCAL_WORLD_SIZE"]))
        if world.size < 1 or not 0 <= world.rank < world.size or world.local_rank < 0:
            raise ConfigError([f"RANK={world.rank}, WORLD_SIZE={world.size}, LOCAL_RANK={world.local_rank}: not a rank of that world"])
        return world

    def label(self) -> str:
        return f"rank {self.rank} of {self.size}" if self.ranked else "one rank"


ALONE = World()  # no torchrun: the one-process daemon


class Collectives:
    """The collectives of one ranked run, over the process group torchrun's environment describes."""

    def __init__(self, world: World, device: torch.device, timeout_s: float) -> None:
        import torch.distributed as dist

        self.world = world
        self.dist = dist
        self.backend = "nccl" if device.type == "cuda" else "gloo"
        self.device = device if self.backend == "nccl" else torch.device("cpu")
        self.timeout_s = timeout_s
        timeout = timedelta(seconds=timeout_s)
        dist.init_process_group(self.backend, store=_store(world, timeout), rank=world.rank, world_size=world.size, timeout=timeout)
        self.broken = False  # a collective failed (a rank died): nothing more can be agreed on
        log.info("%s: process group up (%s)", world.label(), self.backend)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks, in place (moved to the collective's device and back)."""
        try:
            if t.device == self.device:
                self.dist.all_reduce(t)
                return t
            moved = t.to(self.device)
            self.dist.all_reduce(moved)
            t.copy_(moved)
            return t
        except Exception as exc:
            raise self._failed(exc) from exc

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's 1-D ``t`` (of any length), in rank order, on every rank: sizes first, then the padded tensors."""
        try:
            local = t.to(self.device)
            size = torch.tensor([local.numel()], dtype=torch.int64, device=self.device)
            sizes = [torch.zeros_like(size) for _ in range(self.world.size)]
            self.dist.all_gather(sizes, size)
            longest = max(int(s) for s in sizes)
            padded = torch.zeros(longest, dtype=local.dtype, device=self.device)
            padded[: local.numel()] = local
            out = [torch.empty_like(padded) for _ in range(self.world.size)]
            self.dist.all_gather(out, padded)
        except Exception as exc:
            raise self._failed(exc) from exc
        return [o[: int(s)].to(t.device) for o, s in zip(out, sizes)]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (on every rank)."""
        out: list[Any] = [None] * self.world.size
        try:
            self.dist.all_gather_object(out, obj)
        except Exception as exc:
            raise self._failed(exc) from exc
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        box = [obj]
        try:
            self.dist.broadcast_object_list(box, src=0, device=self.device if self.backend == "nccl" else None)
        except Exception as exc:
            raise self._failed(exc) from exc
        return box[0]

    def _failed(self, exc: BaseException) -> RankError:
        """A collective failed: nothing more can be agreed on; say whether it was the timeout and which it is."""
        self.broken = True
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        timed_out = "timed out" in str(exc).lower() or "timeout" in str(exc).lower()
        why = f"no answer within trainer.rank_timeout_s ({self.timeout_s:g} s)" if timed_out else "a rank is gone"
        return RankError(f"{self.world.label()}: a collective failed, {why}: {first[:300]}")

    def close(self) -> None:
        try:
            self.dist.destroy_process_group()
        except Exception as exc:  # a group whose peers are gone: nothing to tear down cleanly
            log.debug("process group teardown: %s", exc)


def _store(world: World, timeout: timedelta) -> Any:
    """Where the ranks meet: torchrun's store, under a prefix of this attempt's own.

    After torchrun restarts the group (``--max-restarts``) its store still holds what the
    previous attempt's ranks wrote there; without a fresh prefix the new ranks read each
    other's old addresses and fail to connect (seen here: gloo "Connection refused" to a
    port of the ranks before).
    """
    import torch.distributed as dist

    addr, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500"))
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # torchrun hosts it; otherwise rank 0 does
    store = dist.TCPStore(addr, port, world.size, is_master=not agent and world.leader, timeout=timeout)
    # Rank 0 hosting the store (not torchrun's agent: `streamtrain run` across hosts) makes a new one each time: no
    # earlier attempt's keys in it, and the agents' restart counts, which differ once a host has been replaced, unused.
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") if agent else "own-store"
    return dist.PrefixStore(f"streamtrain/attempt-{attempt}", store)


@dataclass
class Turn:
    """What every rank agreed on for this turn of the loop."""

    samples: int  # over all ranks
    stop: bool
    snapshot: bool
    asked: bool  # a snapshot was asked for (SIGUSR1) on some rank
    moments: torch.Tensor  # float64: the summed batch moments (see Learner.batch_moments)


def control(coll: Collectives, samples: int, stop: bool, snapshot: bool, asked: bool, moments: torch.Tensor) -> Turn:
    """The turn's one small all-reduce: counts, flags and batch moments summed over the ranks."""
    head = torch.tensor([float(samples), float(stop), float(snapshot), float(asked)], dtype=torch.float64)
    vec = torch.cat([head, moments.to("cpu", torch.float64)])
    coll.all_reduce(vec)
    return Turn(int(vec[_SAMPLES]), vec[_STOP] > 0, vec[_SNAPSHOT] > 0, vec[_ASKED] > 0, vec[_HEAD:])
