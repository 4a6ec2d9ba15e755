"""Serving in tests: the app on a real uvicorn server in a thread; the process and the client are bench.serving's."""

from __future__ import annotations

import threading
import time
from typing import Any

from bench.serving import Client, ServeProcess  # noqa: F401 -- the tests' helpers too
from tests.kafka_util import free_port


class InProcess:
    """An ASGI app on uvicorn in a thread of this process, on a free port."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False, lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="test-uvicorn", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
