"""``streamtrain serve --repo DIR``: serve the newest valid version of a model, reloading as new ones are published.

One model per process.  The HTTP side (FastAPI, uvicorn) comes with the ``serve`` extra
(``pip install 'streamtrain[serve]'``) and is imported only here, so the daemon never
needs it.  torch runs one intra-op thread per request by default: small models answer
faster that way than with a pool that wakes for every call.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from streamtrain.serve.metrics import ServeMetrics
from streamtrain.serve.repository import NAME_RE
from streamtrain.streams.logs import setup_logging

__all__ = ["add_parser", "build", "main"]

log = logging.getLogger("streamtrain.serve")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
DEFAULT_PORT = 8501  # TF Serving's REST port


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a published model over HTTP (KServe/TF Serving v1), reloading new versions (needs the serve extra)",
        description="Serve the newest valid version of <repo>/<name>/<version>/ (written by the daemon's publish.*) "
        "on POST /v1/models/<name>:predict, with /healthz, /readyz and /metrics.",
    )
    p.add_argument("--repo", required=True, help="the model repository: the daemon's publish.dir")
    p.add_argument("--name", help="the model's name (publish.name); default: the only model in the repository")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 in a container; default 127.0.0.1)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to bind (default {DEFAULT_PORT}, TF Serving's REST port)")
    p.add_argument("--poll-seconds", type=float, default=1.0, help="how often to look for new versions (default 1)")
    p.add_argument("--max-body-bytes", type=int, default=4 << 20, help="larger request bodies get a 413 (default 4 MiB)")
    p.add_argument("--max-instances", type=int, default=4096, help="most instances in one request (default 4096)")
    p.add_argument(
        "--inline-max-bytes",
        type=int,
        default=64 << 10,
        help="bodies up to this are predicted on the event loop, larger ones on a worker thread (default 64 KiB; 0: always a thread)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch (or onnxruntime) intra-op threads per request (default 1)")
    p.add_argument(
        "--runtime",
        default="torch",
        choices=("torch", "onnx"),
        help="torch (model.pt, default) or onnx: each version's model.onnx in onnxruntime (publish.onnx; the onnx extra)",
    )
    p.add_argument(
        "--server",
        default="fastapi",
        choices=("fastapi", "kserve"),
        help="fastapi (default: this package's app) or kserve: KServe's ModelServer, with gRPC v2 (the kserve extra; docs/OPERATIONS.md)",
    )
    p.add_argument("--grpc-port", type=int, help="--server kserve: also serve gRPC v2 on this port")
    p.add_argument("--topic", help="publish.topic: a record there wakes the reload at once (with --bootstrap)")
    p.add_argument("--bootstrap", help="Kafka bootstrap servers of --topic")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    p.add_argument("--log-format", default="text", choices=("text", "json"))


def build(
    repo: str | Path,
    name: str,
    poll_s: float = 1.0,
    max_body_bytes: int = 4 << 20,
    max_instances: int = 4096,
    inline_bytes: int = 64 << 10,
    runtime: str = "torch",
    threads: int = 1,
):
    """(ASGI app, watcher, metrics), the watcher having scanned once (so a version there is served from the first request)."""
    from streamtrain.serve.app import create_app
    from streamtrain.serve.watcher import ModelWatcher  # torch: here, so the CLI's other commands start without it

    metrics = ServeMetrics()
    watcher = ModelWatcher(repo, name, metrics, poll_s, runtime, threads)
    watcher.check()
    return create_app(watcher, metrics, max_body_bytes, max_instances, inline_bytes), watcher, metrics


def main(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        print("streamtrain serve: needs FastAPI and uvicorn: pip install 'streamtrain[serve]'", file=sys.stderr)
        return EXIT_USAGE
    import torch

    setup_logging(args.log_level, args.log_format)
    name = args.name or _only_model(Path(args.repo))
    if name is None:
        return EXIT_USAGE
    if not NAME_RE.match(name):
        print(f"streamtrain serve: --name {name!r}: letters, digits, '.', '_' or '-'", file=sys.stderr)
        return EXIT_USAGE
    if args.grpc_port is not None and args.server != "kserve":
        print("streamtrain serve: --grpc-port needs --server kserve (the FastAPI server speaks HTTP only)", file=sys.stderr)
        return EXIT_USAGE
    if (args.topic is None) != (args.bootstrap is None):
        print("streamtrain serve: --topic and --bootstrap go together", file=sys.stderr)
        return EXIT_USAGE
    torch.set_num_threads(max(1, args.threads))
    if args.server == "kserve":
        return _kserve(args, name)
    app, watcher, _metrics = build(
        args.repo, name, args.poll_seconds, args.max_body_bytes, args.max_instances, args.inline_max_bytes, args.runtime, args.threads
    )
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    stopped = []
    with _watching(watcher, args, name) as served:
        log.info(
            "serving %s from %s on http://%s:%d/v1/models/%s (%s)",
            name,
            Path(args.repo) / name,
            args.host,
            args.port,
            name,
            f"version {served.version}" if served else "no valid version yet: waiting for one",
        )
        for sig in (signal.SIGTERM, signal.SIGINT):  # uvicorn shuts down gracefully, then raises the signal again for these
            signal.signal(sig, lambda signum, _frame: stopped.append(signum))
        server.run()  # until SIGTERM/SIGINT: finishes the requests in flight, then returns
    if stopped:
        log.info("stopped by %s", signal.Signals(stopped[0]).name)
    return EXIT_OK if server.started else EXIT_FAILED


def _kserve(args: argparse.Namespace, name: str) -> int:
    """``--server kserve``: the same watcher behind kserve's ModelServer (it binds 0.0.0.0 and handles the signals itself)."""
    try:
        from streamtrain.serve import kserve_model
    except ImportError as exc:
        print(f"streamtrain serve --server kserve: needs the kserve SDK ({exc}): pip install 'streamtrain[kserve]'", file=sys.stderr)
        return EXIT_USAGE
    from streamtrain.serve.watcher import ModelWatcher

    if args.host != "0.0.0.0":
        log.warning("--server kserve listens on every interface (0.0.0.0): kserve has no bind address; --host %s is not used", args.host)
    metrics = kserve_model.metrics_on_kserves_registry()
    watcher = ModelWatcher(args.repo, name, metrics, args.poll_seconds, args.runtime, args.threads)
    watcher.check()
    with _watching(watcher, args, name) as served:
        log.info(
            "serving %s from %s on kserve's ModelServer, http://0.0.0.0:%d/v2/models/%s%s (%s)",
            name,
            Path(args.repo) / name,
            args.port,
            name,
            "" if args.grpc_port is None else f" and gRPC on port {args.grpc_port}",
            f"version {served.version}" if served else "no valid version yet: waiting for one",
        )
        kserve_model.serve(watcher, metrics, args.port, args.grpc_port, args.max_instances)
    return EXIT_OK


@contextlib.contextmanager
def _watching(watcher: Any, args: argparse.Namespace, name: str) -> Iterator[Any]:
    """The watcher started (and, with --topic, the nudger that wakes it); the version served now; both closed after."""
    watcher.start()
    nudger = None
    if args.topic:
        from streamtrain.serve.topic import TopicNudger

        nudger = TopicNudger(args.bootstrap, args.topic, name, watcher.nudge)
        nudger.start()
    try:
        yield watcher.current
    finally:
        watcher.close()
        if nudger is not None:
            nudger.close()


def _only_model(repo: Path) -> str | None:
    names = sorted(p.name for p in repo.iterdir() if p.is_dir() and NAME_RE.match(p.name)) if repo.is_dir() else []
    if len(names) == 1:
        return names[0]
    found = f"it holds {', '.join(names)}" if names else "it holds no model yet"
    print(f"streamtrain serve: give --name: {found} ({repo})", file=sys.stderr)
    return None
