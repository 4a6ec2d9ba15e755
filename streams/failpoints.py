"""Fail points: faults the fault suite switches on from outside, to test the last lines of defence.

``STREAMTRAIN_FAILPOINTS="decode=ACTION:MARKER"`` makes every decoder built from then on
fail, as a bug would, on a consumed batch holding a record whose bytes contain
``MARKER``: ``raise`` (an exception out of ``decode()``, outside the per-record boundary),
``segv`` (the process dies of SIGSEGV, as a crash in a parser's C code would) or ``exit``
(``os._exit(3)``).  Unset (always, outside the tests), nothing is wrapped and nothing is
checked: the variable is read once per decoder built.  The same idea as FreeBSD's
fail(9) points and etcd's gofail.
"""

from __future__ import annotations

import os

ENV = "STREAMTRAIN_FAILPOINTS"
ACTIONS = ("raise", "segv", "exit")


def wrap_decoder(decoder):
    """``decoder``, or a failing stand-in for it when the ``decode`` fail point is set."""
    spec = dict(part.split("=", 1) for part in os.environ.get(ENV, "").split(";") if "=" in part).get("decode")
    if not spec:
        return decoder
    action, _, marker = spec.partition(":")
    if action not in ACTIONS or not marker:
        raise ValueError(f"{ENV}: decode must be one of {', '.join(ACTIONS)} and a marker, e.g. decode=raise:POISON; got {spec!r}")
    return _FailingDecoder(decoder, action, marker.encode())


class _FailingDecoder:
    def __init__(self, inner, action: str, marker: bytes) -> None:
        self.inner = inner
        self.action = action
        self.marker = marker
        self.width = inner.width

    def decode(self, values):
        if any(v is not None and self.marker in v for v in values):
            if self.action == "segv":  # a real one, in this thread (a signal sent with kill may land on another thread)
                import ctypes

                ctypes.string_at(0)
            if self.action == "exit":
                os._exit(3)
            raise RuntimeError(f"fail point decode=raise: a record holds {self.marker!r}")
        return self.inner.decode(values)
