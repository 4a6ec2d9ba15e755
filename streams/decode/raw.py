"""Raw: little-endian float32 features followed by the label, a fixed size per record."""

from __future__ import annotations

from itertools import compress

import numpy as np

from streamtrain.streams.decode.common import Decoded, LabelRule, Reject, _finish, _lengths


class RawDecoder:
    """Little-endian float32 features followed by the label: ``4 * (width + 1)`` bytes."""

    def __init__(self, width: int, rule: LabelRule, max_bytes: int) -> None:
        self.width = width
        self.rule = rule
        self.max_bytes = max_bytes
        self.record_bytes = 4 * (width + 1)

    def decode(self, values: list[bytes | None]) -> Decoded:
        n = len(values)
        lengths = _lengths(values)
        ok = lengths == self.record_bytes
        rejects: list[Reject] = []
        if ok.all():
            good = values  # (lengths are all record_bytes: no null among them)
            idx = np.arange(n, dtype=np.int64)
        else:
            for i in np.flatnonzero(~ok):
                got = int(lengths[i])
                if got > self.max_bytes:
                    rejects.append(Reject(int(i), "oversized", f"record is {got} bytes, limit is {self.max_bytes} (data.max_record_bytes)"))
                elif got <= 0:
                    rejects.append(
                        Reject(int(i), "undecodable", "record value is empty" if got == 0 else "record value is null (tombstone)")
                    )
                else:
                    rejects.append(
                        Reject(
                            int(i),
                            "wrong_shape",
                            f"raw record must be {self.record_bytes} bytes ({self.width} features + label as float32), got {got}",
                        )
                    )
            good = list(compress(values, ok))
            idx = np.flatnonzero(ok).astype(np.int64)
        flat = np.frombuffer(b"".join(good), dtype="<f4").reshape(len(good), self.width + 1)
        return _finish(flat[:, : self.width], flat[:, self.width], idx, self.rule, rejects, nbytes=int(np.maximum(lengths, 0).sum()))
