"""Offsets done past a partition's position, as a snapshot keeps them: one bit per offset, compressed.

With a join, a partition's position is the offset of its oldest record still waiting
(every record before it is done); records after it are trained out of order, as their
labels come.  Those are the *done* offsets: a restart reads the partition again from its
position and skips them.  They travel from the ingest process with the batch that holds
their rows, are kept by the trainer's ``OffsetTracker`` as arrays appended per batch, and
are compacted (below the position dropped, made one sorted array) only when a snapshot is
taken.  In a snapshot's meta they are ``[[topic, partition, first, "<base64>"], ...]``:
the offsets from ``first`` on as a bitmap (``numpy.packbits``, little bit order), deflated
(zlib) and base64-encoded: a window of 1 M offsets of which 5 % are done takes about 70 KB
in meta.json, one of which half are done at random about 165 KB (``python -m bench.join``).
"""

from __future__ import annotations

import base64
import zlib

import numpy as np


def compact(chunks: list[np.ndarray], base: int) -> np.ndarray:
    """The distinct offsets >= ``base`` of ``chunks``, sorted (int64), without a sort: a bitmap over their span."""
    if not chunks:
        return np.empty(0, np.int64)
    a = np.concatenate(chunks) if len(chunks) > 1 else np.asarray(chunks[0], np.int64)
    a = a[a >= base]
    if not len(a):
        return np.empty(0, np.int64)
    first = int(a.min())
    mask = np.zeros(int(a.max()) - first + 1, bool)
    mask[a - first] = True
    return np.flatnonzero(mask).astype(np.int64) + first


def encode(offsets: np.ndarray) -> tuple[int, str]:
    """Sorted distinct offsets -> ``(first, base64 of the deflated bitmap from first)``."""
    if not len(offsets):
        return 0, ""
    first = int(offsets[0])
    mask = np.zeros(int(offsets[-1]) - first + 1, bool)
    mask[np.asarray(offsets, np.int64) - first] = True
    return first, base64.b64encode(zlib.compress(np.packbits(mask, bitorder="little").tobytes(), 1)).decode()


def decode(first: int, text: str) -> np.ndarray:
    """``encode``'s inverse: the sorted offsets (int64)."""
    if not text:
        return np.empty(0, np.int64)
    bits = np.unpackbits(np.frombuffer(zlib.decompress(base64.b64decode(text)), np.uint8), bitorder="little")
    return np.flatnonzero(bits).astype(np.int64) + int(first)
