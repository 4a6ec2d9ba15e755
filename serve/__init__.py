"""Serving: the model repository the daemon publishes into, and ``streamtrain serve``, the HTTP server that reads it.

``repository`` (the version layout, no torch) is shared by both sides; ``model`` loads
and validates a version; ``watcher`` hot-reloads; ``app`` and ``server`` are the HTTP
side, on FastAPI and uvicorn (the ``serve`` extra), imported only by ``streamtrain serve``.
"""
