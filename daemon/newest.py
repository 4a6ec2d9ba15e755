"""One background thread that works on the newest item handed to it: the committer's and the publisher's.

Both mirror durable snapshots somewhere slow (the consumer group, the model repository)
and must never hold up training or snapshots, and for both only the newest item
matters: one not yet started is replaced by a newer one.  A failure goes to
``on_error`` and the thread goes on with the next item.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any


class NewestOnly:
    """``work(item)`` on a thread of its own, for the newest item submitted; see the module docstring."""

    def __init__(self, name: str, work: Callable[[Any], None], on_error: Callable[[Any, Exception], None]) -> None:
        self._work = work
        self._on_error = on_error
        self._pending: Any = None
        self._busy = False
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, item: Any) -> Any:
        """Work on ``item`` soon; returns the item it replaces (submitted, not started), or None."""
        with self._cond:
            replaced, self._pending = self._pending, item
            self._cond.notify_all()
        return replaced

    def wait(self, timeout: float) -> bool:
        """Until everything submitted is done (or has failed); False if ``timeout`` passed first."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._busy or self._pending is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout: float) -> bool:
        """Give what was submitted ``timeout`` seconds, then stop; False if it was abandoned (the thread may still be in it)."""
        done = self.wait(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if done:
            self._thread.join(timeout)
        return done

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                if self._pending is None:
                    return
                item, self._pending = self._pending, None
                self._busy = True
            try:
                self._work(item)
            except Exception as exc:  # never let the thread die: the next item tries again
                self._on_error(item, exc)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
