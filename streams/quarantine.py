"""The last line of defence: a record that still crashes the decoder must not stop training.

Every decoder turns one record's bytes into a row through the per-record boundary
(:func:`streamtrain.streams.decode.common.each_record`), so a bad record is a reject with
a reason.  This is for the bug nobody found yet, at the one place the ingest loop calls
the decoder, in two depths:

- **An exception out of** ``decode()`` (a bug outside the per-record boundary): the batch
  is bisected, each half decoded again, down to the records that raise alone; those are
  rejected with the reason ``decoder_crash`` (the exception in the dead-letter headers and
  in an ERROR log line) and the rest of the batch decodes as it would have.
- **The ingest process dies while decoding** (a segfault in a parser's C code, an abort):
  no exception to catch.  Before each decode the batch's ``(partition, offset)`` pairs are
  written to a small marker file beside the snapshots (two ``pwrite`` calls a batch, in
  the page cache: they survive the process, not the machine).  When the daemon sees its
  ingest process end unasked, it keeps that marker as ``*.crashed`` and exits 1 (a
  supervisor restarts it).  The next start decodes those records in a throwaway child
  process first, bisecting down to the ones that kill it, and dead-letters them as
  ``decoder_crash`` before the rest is decoded in-process.  A crash that a fresh process
  does not reproduce narrows over the next starts: the batch's records are then decoded
  one at a time, each under a marker of its own, so the one that kills the process is
  known after one more crash and rejected without being decoded again.  A kill of the
  whole group (``kill -9``, systemd's SIGKILL) leaves a marker but no ``*.crashed``: it
  is not a decoder crash and costs nothing at the next start.

``data.on_decoder_crash: stop`` makes such a record an error that stops the daemon
instead (Kafka Streams' LogAndFail); the default, ``dead_letter``, is LogAndContinue.
Either way the record is never trained and never lost: it is dead-lettered like any
reject, and positions pass it only once that is acknowledged.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from streamtrain.streams.decode import Decoded, Decoder, LabelRule, Reject, make_decoder
from streamtrain.streams.decode.common import unexpected
from streamtrain.streams.errors import DecoderCrashError
from streamtrain.streams.slots import TopicPartition as TP
from streamtrain.streams.split import EVERYTHING, Share

log = logging.getLogger("streamtrain.ingest")

DECODER_MARKERS = "decoder-markers"  # the markers' folder inside snapshot.dir
PROBE_TIMEOUT_S = 60.0  # a probe that runs longer counts as a crash (a decoder that hangs on the record)
_BATCH, _PROBED, _ALONE = "batch", "probed", "alone"  # what the marker says was being decoded


def marker_path(directory: str | Path, share: Share = EVERYTHING, side: str = "") -> Path:
    """The marker file of one ingest loop (rank and worker: each writes its own; a join's label decoder one more)."""
    return Path(directory) / f"r{share.rank}-w{share.worker}{'.' + side if side == 'labels' else ''}.decoding"


def keep_crashed_marker(directory: str | Path | None, share: Share, why: str) -> None:
    """The ingest process ended unasked: keep what it was decoding for the next start (called by its parent)."""
    if directory is None:
        return
    kept = False
    for path in (marker_path(directory, share), marker_path(directory, share, "labels")):
        try:
            with open(path, "rb") as f:
                if f.read(1) in (b"", b"\n"):
                    continue  # it was not decoding: the crash was elsewhere
            os.replace(path, path.with_suffix(".crashed"))
            kept = True
        except OSError:
            continue
    if not kept:
        return
    log.error("the ingest process died while decoding a batch (%s); its records are checked on the next start", why)


class Quarantine:
    """Calls the decoder for the ingest loop; finds and rejects the records that crash it."""

    def __init__(
        self,
        decoder: Decoder,
        data: Any,
        rule: LabelRule,
        directory: str | Path | None = None,
        share: Share = EVERYTHING,
        trust_own_marker: bool = False,
        side: str = "",
    ) -> None:
        """``directory``: where the markers live (None: in-process bisection only).

        ``trust_own_marker``: read this loop's own leftover marker as a crash too (thread mode: a
        crash takes the whole daemon with it, so no parent is left to keep the marker).
        """
        self.decoder = decoder
        self.data = data
        self.rule = rule
        self.policy = getattr(data, "on_decoder_crash", "dead_letter")
        self.share = share
        self.side = side  # make_decoder's side: a join decodes its feature and its label records apart
        self.crashed = 0  # records rejected as decoder_crash by this loop
        self._suspects: dict[TP, dict[int, str]] = {}  # offsets to check before decoding, by what the marker said
        self._fd: int | None = None
        self._tps_json = (0, b"[]")  # the partitions list as last written (the loop's list only grows)
        if directory is not None:
            self._load(Path(directory), trust_own_marker)
            os.makedirs(directory, exist_ok=True)
            self._fd = os.open(marker_path(directory, share, side), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)

    # ------------------------------------------------------------------ the loop's call
    def decode(
        self, values: list[bytes | None], part: np.ndarray, offset: np.ndarray, tps: list[TP], where: Callable[[int], str]
    ) -> Decoded:
        """The decoder's result for ``values``; records that crash it are ``decoder_crash`` rejects.

        ``part``/``offset``: each message's index into ``tps`` and its offset (the marker's
        content); ``where(i)``: message ``i`` in words, for the log.
        """
        crashers: dict[int, Reject] = {}
        mode = _BATCH
        if self._suspects:
            mode = self._check_suspects(values, part, offset, tps, crashers)
        if mode == _ALONE:
            return self._decode_alone(values, part, offset, tps, crashers, where)
        self._mark(mode, part, offset, tps)
        try:
            out = self.decoder.decode(_without(values, crashers))
        except Exception as exc:
            log.error(
                "the decoder failed on a batch of %d record(s) (%s: %s); looking for the record(s) that fail it",
                len(values),
                type(exc).__name__,
                exc,
            )
            self._find(values, [i for i in range(len(values)) if i not in crashers], self._raises, crashers)
            out = self.decoder.decode(_without(values, crashers))  # raising again: not one record's doing, a bug to stop on
        finally:
            self._clear()
        return self._settle(out, values, crashers, where)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # ------------------------------------------------------------------ in-process failures
    def _raises(self, values: Sequence[bytes | None], idx: list[int]) -> Reject | None:
        try:
            self.decoder.decode([values[i] for i in idx])
        except Exception as exc:
            log.debug("decoding %d record(s) alone raised", len(idx), exc_info=True)
            return unexpected(idx[0], exc, "decoder_crash")
        return None

    def _find(
        self,
        values: Sequence[bytes | None],
        idx: list[int],
        fails: Callable[[Sequence[bytes | None], list[int]], Reject | None],
        out: dict[int, Reject],
    ) -> None:
        """Bisect ``idx`` down to the records for which ``fails`` holds alone."""
        if not idx:
            return
        failure = fails(values, idx)
        if failure is None:
            return
        if len(idx) == 1:
            out[idx[0]] = failure
            return
        half = len(idx) // 2
        self._find(values, idx[:half], fails, out)
        self._find(values, idx[half:], fails, out)

    def _settle(self, out: Decoded, values: list[bytes | None], crashers: dict[int, Reject], where: Callable[[int], str]) -> Decoded:
        """Put the crashers' rejects in place of the stand-ins they were decoded as, and say so loudly."""
        if not crashers:
            return out
        for i, r in sorted(crashers.items()):
            self.crashed += 1
            if self.policy == "stop":
                raise DecoderCrashError(
                    f"record {where(i)} crashed the decoder ({r.error}); stopping (data.on_decoder_crash=stop). It is not "
                    "trained and its offset is not committed: set data.on_decoder_crash to dead_letter to send it to the "
                    "dead-letter topic and go on"
                )
            log.error(
                "record %s crashed the decoder (%s): dead-lettered as decoder_crash (data.on_decoder_crash=dead_letter). "
                "A record should be rejected with a reason, never crash the decoder: please report it with the dead letter",
                where(i),
                r.error,
            )
        rejects = [r for r in out.rejects if r.index not in crashers] + list(crashers.values())
        rejects.sort(key=lambda r: r.index)
        out.rejects = rejects
        out.nbytes += sum(len(values[i] or b"") for i in crashers)
        return out

    # ------------------------------------------------------------------ crashes of the process
    def _load(self, directory: Path, trust_own: bool) -> None:
        """Suspects from the markers that a crashed ingest left (its parent renamed them ``*.crashed``)."""
        labels = self.side == "labels"
        files = sorted(f for f in directory.glob("*.crashed") if f.name.endswith(".labels.crashed") == labels)
        own = marker_path(directory, self.share, self.side)
        if trust_own and own.is_file():
            files.append(own)
        for path in files:
            try:
                entries = _read_marker(path.read_bytes())
            except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
                log.warning("ignoring unreadable decoder-crash marker %s: %s", path, exc)
                entries = []
            mine = [(tp, o, mode) for tp, o, mode in entries if self.share.owns(tp)]
            for tp, o, mode in mine:
                self._suspects.setdefault(tp, {})[o] = mode
            if mine:
                modes = {mode for _, _, mode in mine}
                log.warning(
                    "the ingest process died while decoding %d record(s) of %s: they are %s",
                    len(mine),
                    ", ".join(sorted({f"{t}[{p}]" for (t, p), _, _ in mine})),
                    "rejected (each was being decoded alone)"
                    if modes == {_ALONE}
                    else "decoded one at a time (a separate process did not reproduce the crash)"
                    if _PROBED in modes
                    else "decoded in a separate process first",
                )
            if path != own and len(mine) == len(entries):
                path.unlink(missing_ok=True)  # taken over: this loop's own marker carries what is unresolved

    def _check_suspects(
        self, values: list[bytes | None], part: np.ndarray, offset: np.ndarray, tps: list[TP], crashers: dict[int, Reject]
    ) -> str:
        """Deal with the suspects in this batch; the marker mode to decode it under."""
        hit: dict[str, list[int]] = {}
        for j, tp in enumerate(tps):
            offsets = self._suspects.get(tp)
            if not offsets:
                continue
            mine = np.flatnonzero(part == j)
            if not len(mine):
                continue
            for i in mine.tolist():
                mode = offsets.pop(int(offset[i]), None)
                if mode is not None:
                    hit.setdefault(mode, []).append(i)
            first = int(offset[mine].min())
            for o in [o for o in offsets if o < first]:  # read past (a partition is read in order): not in this run's way
                del offsets[o]
            if not offsets:
                del self._suspects[tp]
        for i in hit.get(_ALONE, []):  # decoded alone the last time, and the process died: it is the one
            crashers[i] = Reject(
                i, "decoder_crash", "the ingest process died decoding this record alone (a crash no exception could report)"
            )
        if hit.get(_PROBED):
            return _ALONE  # a fresh process did not reproduce the crash: this time each record alone
        suspects = hit.get(_BATCH, [])
        if suspects:
            log.warning("decoding %d suspect record(s) in a separate process first", len(suspects))
            self._probe_suspects(values, suspects, crashers)
            return _PROBED
        return _BATCH

    def _probe_suspects(self, values: Sequence[bytes | None], idx: list[int], crashers: dict[int, Reject]) -> None:
        """Find the suspects that kill a process, in throwaway children: the batch as a whole, then one record at a time.

        The child decoding one at a time says which record it starts on before each: when it
        dies, that one is the crasher, and a new child goes on after it (two children, and one
        more per crasher).  A crash only the whole batch reproduces is bisected instead.
        """
        if self._child(values, idx, one_at_a_time=False)[0] is None:
            return
        found: dict[int, Reject] = {}
        rest = list(idx)
        while rest:
            crash, started = self._child(values, rest, one_at_a_time=True)
            if crash is None:
                break
            if not started:  # the child died before its first record: it says nothing about them
                log.error("a probing process died before decoding anything (%s); the suspects are decoded here", crash.error)
                return
            found[crash.index] = crash
            rest = rest[rest.index(crash.index) + 1 :]
        if not found:  # none crashes alone: the batch does
            self._find(values, idx, lambda v, i: self._child(v, i, one_at_a_time=False)[0], found)
        crashers.update(found)

    def _child(self, values: Sequence[bytes | None], idx: list[int], one_at_a_time: bool) -> tuple[Reject | None, bool]:
        """Decode ``values[idx]`` in a throwaway child: how it died (a reject of the record it was on), or None."""
        blob = pickle.dumps((self.data, self.rule, self.side, [values[i] for i in idx], one_at_a_time), protocol=pickle.HIGHEST_PROTOCOL)
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "streamtrain.streams.quarantine"], input=blob, capture_output=True, timeout=PROBE_TIMEOUT_S
            )
            code, said = proc.returncode, proc.stdout
        except subprocess.TimeoutExpired as exc:
            code, said = None, exc.stdout or b""
        if code == 0:
            return None, False
        started = said.split()[-1:]  # one at a time: the position it was on when it died
        if started == [b"done"]:  # it died on its way out, after every record: not a record's doing
            return None, True
        on = idx[int(started[0])] if started and started[0].isdigit() and int(started[0]) < len(idx) else idx[0]
        if code is None:
            return Reject(
                on, "decoder_crash", f"decoding this record did not finish in {PROBE_TIMEOUT_S:.0f} s (a decoder that hangs)"
            ), bool(started)
        if code < 0:
            how = f"killed by {signal.Signals(-code).name}" if -code in signal.valid_signals() else f"killed by signal {-code}"
        else:
            how = f"exit code {code}"
        return Reject(on, "decoder_crash", f"decoding this record crashes a process ({how})"), bool(started)

    def _decode_alone(
        self,
        values: list[bytes | None],
        part: np.ndarray,
        offset: np.ndarray,
        tps: list[TP],
        crashers: dict[int, Reject],
        where: Callable[[int], str],
    ) -> Decoded:
        """Each record decoded on its own under a marker naming it alone: the next crash, if any, names its record."""
        parts = []
        for i in range(len(values)):
            if i in crashers:
                continue
            self._mark(_ALONE, part[i : i + 1], offset[i : i + 1], tps)
            try:
                one = self.decoder.decode([values[i]])
            except Exception as exc:
                crashers[i] = unexpected(i, exc, "decoder_crash")
                continue
            finally:
                self._clear()
            one.msg_index = one.msg_index + i
            one.rejects = [Reject(r.index + i, r.reason, r.error, r.rows, r.exception) for r in one.rejects]
            parts.append(one)
        out = _concat(parts, self.decoder.width)
        return self._settle(out, values, crashers, where)

    # ------------------------------------------------------------------ the marker
    def _mark(self, mode: str, part: np.ndarray, offset: np.ndarray, tps: list[TP]) -> None:
        """What is about to be decoded: a header line, then the partition indices and offsets as binary."""
        if self._fd is None:
            return
        if self._tps_json[0] != len(tps):
            self._tps_json = (len(tps), json.dumps([list(tp) for tp in tps]).encode())
        unresolved = json.dumps([(tp, o, m) for tp, offs in self._suspects.items() for o, m in offs.items()]).encode()
        head = b'{"mode": "%s", "n": %d, "tps": %s, "unresolved": %s}\n' % (mode.encode(), len(part), self._tps_json[1], unresolved)
        body = np.ascontiguousarray(part, np.int32).tobytes() + np.ascontiguousarray(offset, np.int64).tobytes()
        os.pwrite(self._fd, head + body, 0)

    def _clear(self) -> None:
        """Nothing being decoded: an empty first line (what follows is stale; truncating costs a re-allocation per batch)."""
        if self._fd is not None:
            os.pwrite(self._fd, b"\n", 0)


def _read_marker(blob: bytes) -> list[tuple[TP, int, str]]:
    """A marker's (partition, offset, mode) entries: the batch it names, and the suspects it still carried."""
    head_line, _, body = blob.partition(b"\n")
    if not head_line:  # cleared: nothing was being decoded
        return []
    head = json.loads(head_line)
    n, tps, mode = int(head["n"]), [(str(t), int(p)) for t, p in head["tps"]], str(head["mode"])
    part = np.frombuffer(body[: 4 * n], np.int32)
    offset = np.frombuffer(body[4 * n : 12 * n], np.int64)
    if len(part) != n or len(offset) != n:
        raise ValueError("marker cut short")
    entries = [(tps[j], int(o), mode) for j, o in zip(part.tolist(), offset.tolist())]
    return entries + [((str(t), int(p)), int(o), str(m)) for (t, p), o, m in head.get("unresolved", [])]


def _without(values: list[bytes | None], crashers: dict[int, Reject]) -> list[bytes | None]:
    """The batch with each crasher replaced by a tombstone (its reject is put back by _settle)."""
    if not crashers:
        return values
    return [None if i in crashers else v for i, v in enumerate(values)]


def _concat(parts: list[Decoded], width: int) -> Decoded:
    if not parts:
        return Decoded.empty(width)
    return Decoded(
        np.concatenate([p.x for p in parts]),
        np.concatenate([p.y for p in parts]),
        np.concatenate([p.msg_index for p in parts]),
        [r for p in parts for r in p.rejects],
        sum(p.nbytes for p in parts),
        np.concatenate([p.ids for p in parts]),
    )


def _probe() -> int:
    """The throwaway child: decode what stdin holds, as a batch or one record at a time; exit 0 if that does not crash.

    One at a time, it writes the position of each record before decoding it (and flushes),
    so the parent knows which one it died on.
    """
    data, rule, side, values, one_at_a_time = pickle.load(sys.stdin.buffer)
    decoder = make_decoder(data, rule, side)
    for i, chunk in enumerate([[v] for v in values] if one_at_a_time else [values]):
        if one_at_a_time:
            os.write(1, b"%d\n" % i)
        try:
            decoder.decode(chunk)
        except Exception:  # an exception is the in-process bisection's to find; this answers "does it kill a process"
            pass
    os.write(1, b"done\n")
    return 0


if __name__ == "__main__":
    sys.exit(_probe())
