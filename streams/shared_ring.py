"""A ring whose slots live in shared memory, filled by the ingest process, drained by the trainer.

The slots are one anonymous shared file (``memfd``: nothing is left behind if the
daemon is killed) mapped by both processes; the trainer's batches are torch views of
it, without a copy.  Two pipes carry the little that moves: the ingest process
announces each filled slot (row count, positions, oldest timestamp) and its status on
one, as length-prefixed frames the trainer reads in bulk (one ``read()`` takes every
frame waiting: ~1 us per announcement, against ~6 us with a poll and two reads each,
``python -m bench.frames``); the trainer gives each slot back with one byte on the other.  Slots are
filled and given back in the same order, so a byte is all a slot's return needs.

No thread exists only to move these messages: each pipe is read by the thread that
needs what it carries (the trainer reads announcements in :meth:`SharedRing.get`, the
ingest thread reads given-back slots in :meth:`ChildRing.acquire`).  A hand-off to a
helper thread would wait for the GIL holder's switch interval (5 ms) per batch -- with
a fast trainer that capped the whole pipeline near 70 k samples/s (measured).
"""

from __future__ import annotations

import mmap
import os
import pickle
import select
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from streamtrain.streams.slots import Position, RingClosed, TopicPartition


def ring_bytes(slots: int, batch_size: int, width: int, fields: int = 0) -> int:
    return slots * batch_size * (fields * 8 + (width + 1) * 4)


def map_slots(fd: int, slots: int, batch_size: int, width: int, fields: int = 0) -> tuple[mmap.mmap, np.ndarray, np.ndarray, np.ndarray]:
    """Map the shared file: (mapping, x (slots, batch, width) float32, y (slots, batch) float32, ids (slots, batch, fields) int64).

    The int64 table rows come first, where the mapping's page alignment aligns them too.
    """
    mm = mmap.mmap(fd, ring_bytes(slots, batch_size, width, fields))
    ni = slots * batch_size * fields
    ids = np.frombuffer(mm, dtype=np.int64, count=ni).reshape(slots, batch_size, fields)
    flat = np.frombuffer(mm, dtype=np.float32, offset=ni * 8)
    nx = slots * batch_size * width
    return mm, flat[:nx].reshape(slots, batch_size, width), flat[nx:].reshape(slots, batch_size), ids


def shared_file(size: int) -> int:
    """An anonymous shared file of ``size`` bytes (memfd; an unlinked temp file elsewhere)."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("streamtrain-ring", 0)  # not inheritable; handed over with pass_fds
    else:  # pragma: no cover - not Linux
        import tempfile

        fd, path = tempfile.mkstemp(prefix="streamtrain-ring-")
        os.unlink(path)
    os.ftruncate(fd, size)
    return fd


_LENGTH = struct.Struct("<I")


def send_frame(fd: int, msg: tuple) -> None:
    """Write one message as a length-prefixed pickle (blocking; partial writes completed)."""
    data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(_LENGTH.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view) :]


class FrameReader:
    """The reading end of :func:`send_frame`: every complete frame waiting, in one ``read()``."""

    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self.fd = fd
        self._buf = bytearray()
        self.eof = False

    def read(self, timeout: float) -> list[tuple]:
        """The messages waiting, after up to ``timeout`` s for the first; ``eof`` is set when the writer closed."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                data = os.read(self.fd, 1 << 16)  # a pipe holds 64 KiB: one read empties it
            except BlockingIOError:
                data = None
            if data == b"":
                self.eof = True
                return self._frames()
            if data:
                self._buf += data
                msgs = self._frames()
                if msgs:
                    return msgs
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.fd], [], [], remaining)[0]:
                return []

    def _frames(self) -> list[tuple]:
        buf, out, i, end = self._buf, [], 0, len(self._buf)
        while end - i >= 4:
            (n,) = _LENGTH.unpack_from(buf, i)
            if end - i - 4 < n:
                break  # the rest of this frame is still on its way
            out.append(pickle.loads(buf[i + 4 : i + 4 + n]))
            i += 4 + n
        if i:
            del buf[:i]
        return out


class SharedRing:
    """The trainer's side: the same ``get``/``release``/``close``/``fill`` as :class:`streams.ring.Ring`."""

    def __init__(self, slots: int, batch_size: int, width: int, pin_memory: bool = False, fields: int = 0) -> None:
        import torch

        from streamtrain.streams.ring import next_ready, slot_views

        self.slots = slots
        self.batch_size = batch_size
        self.width = width
        self.fields = fields
        self.fd = shared_file(ring_bytes(slots, batch_size, width, fields))
        self._mm, self.x_np, self.y_np, self.ids_np = map_slots(self.fd, slots, batch_size, width, fields)
        self.x = torch.from_numpy(self.x_np)
        self.y = torch.from_numpy(self.y_np)
        self.ids = torch.from_numpy(self.ids_np)
        self.views = slot_views(self.x, self.y, self.ids if fields else None)
        self._next_ready = next_ready  # streams.ring imports torch: not at module level (the child imports this module)
        if pin_memory:
            _pin(self.x_np, self.y_np, *((self.ids_np,) if fields else ()))
        self._ready: deque[tuple[int, int, dict, float]] = deque()
        self._lock = threading.Lock()  # one reader of the announcements at a time (trainer or scrape)
        self._frames: FrameReader | None = None
        self._give_back: int | None = None
        self._owed = 0  # released slots not yet given back
        # Give slots back a few at a time: each write wakes the ingest process, and a wake per
        # batch cost the trainer ~35 us of its own (measured), most of it the wake-up itself.
        self.give_back_every = max(1, slots // 4)
        self._closed = False
        self.error: BaseException | None = None
        self.on_status: Callable[[dict[str, Any]], None] = lambda status: None
        self.on_end: Callable[[], BaseException | None] = lambda: None

    @property
    def nbytes(self) -> int:
        return ring_bytes(self.slots, self.batch_size, self.width, self.fields)

    def connect(self, announcements_fd: int, give_back_fd: int) -> None:
        self._frames = FrameReader(announcements_fd)
        self._give_back = give_back_fd

    def fill(self) -> int:
        self.pump()
        return len(self._ready)

    # ------------------------------------------------------------------ reading announcements
    def pump(self, timeout: float = 0.0) -> None:
        """Take in what the ingest process sent, waiting up to ``timeout`` s for the first message.

        A reader that does not wait (a scrape, a health check) skips the pump while the
        trainer is reading: the trainer holds the lock for up to its 0.1 s wait for a batch,
        takes in every status meanwhile, and a scrape used to queue behind it once per
        partition it read.
        """
        if not self._lock.acquire(blocking=timeout > 0):
            return
        try:
            frames = self._frames
            if frames is None:
                return
            try:
                msgs = frames.read(timeout)
            except OSError:
                msgs, frames.eof = [], True
            for msg in msgs:
                self._dispatch(msg)
                if self._frames is None:  # "closed" or an error ended it
                    return
            if frames.eof:
                self._end(self.on_end())
        finally:
            self._lock.release()

    def _dispatch(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "batch":
            self._ready.append(msg[1:])
        elif kind == "status":
            self.on_status(msg[1])
        elif kind == "error":
            self._end(rebuild_error(msg[1]))
        elif kind == "closed":
            self._end(None)

    def _end(self, error: BaseException | None) -> None:
        frames, self._frames = self._frames, None
        if frames is not None:
            os.close(frames.fd)
        self.close(error)

    # ------------------------------------------------------------------ consumer side
    def get(self, timeout: float | None = None):
        if not self._ready and not self._closed:
            self._flush_give_back()  # never wait for a batch while holding slots the child could fill
            self.pump(0.1 if timeout is None else timeout)
        return self._next_ready(self._ready, self.views, self._closed)

    def take(self):
        """The next announced batch without waiting (None if there is none; RingClosed once closed and drained)."""
        if not self._ready and not self._closed:
            self.pump(0)
        return self._next_ready(self._ready, self.views, self._closed)

    def announcements_fd(self) -> int | None:
        """What to wait on (``select``) for the next announcement; None once ended."""
        frames = self._frames
        return frames.fd if frames is not None else None

    def release(self, slot: int) -> None:
        self._owed += 1
        if self._owed >= self.give_back_every:
            self._flush_give_back()

    def flush_give_back(self) -> None:
        """Give back every released slot now (before waiting: the child may be waiting for one)."""
        self._flush_give_back()

    def _flush_give_back(self) -> None:
        if self._owed and self._give_back is not None:
            try:
                os.write(self._give_back, b"\x01" * self._owed)
            except OSError:  # the ingest process is gone; nothing to give back to
                pass
        self._owed = 0

    def close(self, error: BaseException | None = None) -> None:
        if error is not None and self.error is None:
            self.error = error
        self._closed = True

    def detach(self) -> None:
        """Stop taking announcements, close the pipes and the shared file (the ingest process is stopping).

        The mapping stays: batches already handed out are views of it.  Closing the file here
        matters because each restart of the stream (a roll-back) makes a new ring.
        """
        with self._lock:
            frames, self._frames = self._frames, None
            if frames is not None:
                os.close(frames.fd)
        fds = [self._give_back, self.fd]
        self._give_back, self.fd = None, -1
        for fd in fds:
            if fd is not None and fd >= 0:
                os.close(fd)
        self.close()


def _pin(*arrays: np.ndarray) -> None:
    """Page-lock the shared slots for asynchronous host-to-device copies (best effort)."""
    import torch

    if not torch.cuda.is_available():
        return
    for a in arrays:
        torch.cuda.cudart().cudaHostRegister(a.ctypes.data, a.nbytes, 0)


class ChildRing:
    """The ingest process's side: the producer interface of :class:`streams.slots.SlotProducer`."""

    def __init__(self, fd: int, slots: int, batch_size: int, width: int, announcements_fd: int, give_back_fd: int, fields: int = 0) -> None:
        self.slots = slots
        self.batch_size = batch_size
        self._mm, self.x_np, self.y_np, self.ids_np = map_slots(fd, slots, batch_size, width, fields)
        os.close(fd)
        self._announce = announcements_fd
        self._give_back = give_back_fd
        os.set_blocking(give_back_fd, False)
        self._send_lock = threading.Lock()
        self._credits = slots  # every slot starts free
        self._next = 0
        self._closed = False

    def _take_credits(self, timeout: float | None) -> None:
        """Read given-back slots (the calling thread itself: no hand-off), waiting up to ``timeout`` s."""
        if timeout:
            ready, _, _ = select.select([self._give_back], [], [], timeout)
            if not ready:
                return
        try:
            data = os.read(self._give_back, 4096)
        except BlockingIOError:
            return
        if data:
            self._credits += len(data)
        else:
            self._closed = True  # the trainer closed its end

    def acquire(self, timeout: float | None) -> int | None:
        if not self._credits:
            self._take_credits(timeout if timeout is not None else 1.0)
        if self._closed:
            raise RingClosed
        if not self._credits:
            return None
        self._credits -= 1
        slot = self._next % self.slots
        self._next += 1
        return slot

    def wait_free(self, timeout: float) -> bool:
        if not self._credits:
            self._take_credits(timeout)
        return bool(self._credits) or self._closed

    def publish(
        self, slot: int, n: int, positions: dict[TopicPartition, Position], oldest_timestamp: float, done: dict | None = None
    ) -> None:
        self.send(
            ("batch", slot, n, positions, oldest_timestamp) if done is None else ("batch", slot, n, positions, oldest_timestamp, done)
        )

    def give_back(self, slot: int) -> None:
        """An acquired slot left unfilled at shutdown: the process ends, nothing to do."""

    def close(self, error: BaseException | None = None) -> None:
        if error is not None:
            self.send(("error", describe_error(error)))
        self._closed = True

    def send(self, msg: tuple) -> None:
        with self._send_lock:
            try:
                send_frame(self._announce, msg)
            except OSError:  # the trainer is gone
                pass


def describe_error(exc: BaseException) -> dict[str, Any]:
    """A picklable description of an error, rebuilt on the trainer's side into the same class."""
    return {"type": type(exc).__name__, "message": str(exc), "problems": list(getattr(exc, "problems", []) or [])}


def rebuild_error(d: dict[str, Any]) -> BaseException:
    from streamtrain.streams import errors

    cls = getattr(errors, d["type"], None)
    if cls is errors.ConfigError:
        return errors.ConfigError(d["problems"])
    if isinstance(cls, type) and issubclass(cls, errors.StreamtrainError) and cls is not errors.DecodeError:
        return cls(d["message"])
    return errors.StreamtrainError(f"the ingest process failed: {d['type']}: {d['message']}")
