"""The hash of a categorical value: the same id maps to the same row on every host, after every restart, in serving.

A categorical value is hashed as its canonical bytes (:func:`canonical`): a string's
UTF-8, an integer's decimal digits (so ``123`` and ``"123"`` are one category), a
boolean's ``true`` / ``false``.  The hash, *streamtrain hash v1*, is defined on bytes
and a 64-bit seed, and is computed here for a whole column at once (numpy, one pass per
8 bytes of the longest value), in the ingest process::

    word_hash(data, seed):
        h = seed
        for each little-endian 64-bit word w of data, zero-padded to a multiple of 8 bytes:
            h = (h XOR w) * 0x100000001B3  (mod 2**64);  h = h XOR (h >> 32)
        h = h XOR len(data)
        return fmix64(h)            # MurmurHash3's finalizer: h ^= h >> 33; h *= 0xFF51AFD7ED558CCD;
                                    # h ^= h >> 33; h *= 0xC4CEB9FE1A85EC53; h ^= h >> 33

    seed(field)      = word_hash(UTF-8 of the field name, 0xCBF29CE484222325)
    hash(field, v)   = word_hash(canonical(v), seed(field))
    hash(field, missing) = fmix64(seed(field) XOR 0x9E3779B97F4A7C15)
    row(field, v)    = hash(field, v) mod buckets

Every field shares one table of ``data.hash_buckets`` rows: the field's name salts the
hash, so ``user=7`` and ``item=7`` land on different rows, and the memory is fixed
whatever the number of fields (as Vowpal Wabbit's one weight space of 2^b).  Collisions
are accepted and measured, not avoided.  Values of up to 8 bytes never collide before the
modulo (each step is a bijection).  :func:`hash_one` is the reference, value by value; the
column functions must equal it (tests/test_features.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MASK = (1 << 64) - 1
PRIME = 0x100000001B3
OFFSET = 0xCBF29CE484222325
GOLDEN = 0x9E3779B97F4A7C15
_P = np.uint64(PRIME)
_C1 = np.uint64(0xFF51AFD7ED558CCD)
_C2 = np.uint64(0xC4CEB9FE1A85EC53)
_S32, _S33 = np.uint64(32), np.uint64(33)


def canonical(value: object) -> bytes:
    """The bytes a categorical value is hashed as; TypeError for what is not a category (a float, a list, an object)."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")
    if isinstance(value, bool):  # before int: True is an int
        return b"true" if value else b"false"
    if isinstance(value, int):
        return str(value).encode()
    if isinstance(value, bytes):
        return value
    raise TypeError(f"a categorical value must be a string, an integer or a boolean, got {type(value).__name__}")


# ----------------------------------------------------------------------------- the reference, one value at a time


def _fmix64(h: int) -> int:
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & MASK
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & MASK
    return h ^ (h >> 33)


def word_hash(data: bytes, seed: int) -> int:
    h = seed
    padded = data + b"\x00" * (-len(data) % 8)
    for i in range(0, len(padded), 8):
        h = ((h ^ int.from_bytes(padded[i : i + 8], "little")) * PRIME) & MASK
        h ^= h >> 32
    return _fmix64(h ^ len(data))


def field_seed(field: str) -> int:
    return word_hash(field.encode("utf-8"), OFFSET)


def hash_one(field: str, value: object | None) -> int:
    """The 64-bit hash of one value of ``field`` (None: the field's missing value)."""
    seed = field_seed(field)
    if value is None:
        return _fmix64(seed ^ GOLDEN)
    return word_hash(canonical(value), seed)


# ----------------------------------------------------------------------------- whole columns


def _fmix64_np(h: np.ndarray) -> np.ndarray:
    h ^= h >> _S33
    h *= _C1
    h ^= h >> _S33
    h *= _C2
    h ^= h >> _S33
    return h


def hash_padded(words: np.ndarray, lengths: np.ndarray, seed: int) -> np.ndarray:
    """Hashes (uint64) of values given as zero-padded little-endian words (n, k) and their byte lengths (n,)."""
    n, k = words.shape
    h = np.full(n, seed, np.uint64)
    if k:
        nwords = (lengths + 7) // 8
        for j in range(k):
            w = words[:, j]
            step = h ^ w
            step *= _P
            step ^= step >> _S32
            if (nwords > j).all():
                h = step
            else:  # past a shorter value's last word, it keeps its hash
                h = np.where(nwords > j, step, h)
    h ^= lengths.astype(np.uint64)
    return _fmix64_np(h)


def hash_bytes(values: Sequence[bytes], seed: int) -> np.ndarray:
    """Hashes (uint64) of ``values`` (canonical bytes) under ``seed``, as the reference gives them."""
    n = len(values)
    if n == 0:
        return np.empty(0, np.uint64)
    lengths = np.fromiter(map(len, values), np.int64, n)
    width = max(8, int(-(-lengths.max() // 8) * 8))
    # numpy's fixed-width bytes pad with zeros in C: the words come without a Python loop per value
    padded = np.array(values, dtype=f"S{width}")
    words = padded.view(np.uint64).reshape(n, width // 8) if padded.dtype.itemsize == width else _repad(padded, width, n)
    return hash_padded(words, lengths, seed)


def _repad(padded: np.ndarray, width: int, n: int) -> np.ndarray:
    out = np.zeros((n, width), np.uint8)
    raw = padded.view(np.uint8).reshape(n, padded.dtype.itemsize)
    out[:, : raw.shape[1]] = raw
    return out.view(np.uint64)


def hash_arrow(array, seed: int) -> np.ndarray:
    """Hashes of an Arrow string, binary or integer array without nulls (integers as their decimal digits)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_dictionary(array.type):  # hash the dictionary once, then look the rows up
        return hash_arrow(array.dictionary, seed)[array.indices.to_numpy(zero_copy_only=False)]
    if pa.types.is_integer(array.type) or pa.types.is_boolean(array.type):
        array = pc.cast(array, pa.string()) if pa.types.is_integer(array.type) else pc.if_else(array, "true", "false")
    if pa.types.is_large_string(array.type) or pa.types.is_large_binary(array.type):
        array = array.cast(pa.string() if pa.types.is_large_string(array.type) else pa.binary())
    n = len(array)
    if n == 0:
        return np.empty(0, np.uint64)
    buffers = array.buffers()
    offsets = np.frombuffer(buffers[1], np.int32, n + 1, array.offset * 4)
    data = np.frombuffer(buffers[2], np.uint8) if buffers[2] is not None else np.zeros(0, np.uint8)
    lengths = np.diff(offsets).astype(np.int64)
    width = max(8, int(-(-lengths.max() // 8) * 8))
    first, last = int(offsets[0]), int(offsets[-1])
    # each value's bytes to the start of its zero-padded row: one scatter over the bytes, not over n x width
    padded = np.zeros(n * width, np.uint8)
    row_start = np.arange(n, dtype=np.int64) * width - (offsets[:-1].astype(np.int64) - first)
    padded[np.repeat(row_start, lengths) + np.arange(last - first)] = data[first:last]
    return hash_padded(padded.view(np.uint64).reshape(n, width // 8), lengths, seed)


def missing_hash(seed: int) -> np.uint64:
    return np.uint64(_fmix64(seed ^ GOLDEN))


def buckets_of(hashes: np.ndarray, buckets: int) -> np.ndarray:
    """Rows of the shared table (int64, 0 <= row < buckets)."""
    return (hashes % np.uint64(buckets)).astype(np.int64)
