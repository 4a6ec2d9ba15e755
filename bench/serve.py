"""Requests/s and latency of ``streamtrain serve``'s ``:predict`` and v2 ``infer``: ``python -m bench.serve``.

The MLP of the other benchmarks (16 features, hidden [64]) is trained a few steps and
published by the trainer's own publisher; the real command (``python -m streamtrain
serve``) serves it, and keep-alive HTTP/1.1 clients (``http.client``, one connection per
thread) post, batch 1 and batch 64, one and several clients at once: v1
``{"instances": [...]}`` of named features, or v2 (``--protocols v1,v2``) the bytes
Triton's client sends by default -- a JSON header and the features as binary FP32, the
outputs asked for binary.  Latency is a request's round trip as the client sees it; the
clients run on the same machine as the server and share its cores.  ``--servers
fastapi,kserve`` runs the same cases against ``streamtrain serve --server kserve`` (KServe's
ModelServer) in the same run, server after server for ``--rounds``, and prints each one's
start to ready and RSS and the ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from bench.common import FEATURES, MODELS, WIDTH, machine, print_machine, quiet_logs, samples, table
from bench.serving import Client, ServeProcess
from demo.broker import free_port
from streamtrain.config.schema import config_from_dict
from streamtrain.daemon.metrics import Metrics
from streamtrain.daemon.trainer import Trainer
from streamtrain.streams.ring import Batch

NAME = "mlp"


def publish(root: Path, onnx: bool = False) -> int:
    """Train the benchmark MLP a few steps and publish it into ``root``; returns its version."""
    spec = MODELS["mlp"]
    cfg = config_from_dict(
        {
            "kafka": {"topics": ["bench"]},
            "data": {"format": "json", "features": FEATURES, "label": "y"},
            "model": {"name": spec.name, "params": spec.params},
            "trainer": {"task": "regression"},
            "snapshot": {"dir": str(root / "snapshots")},
            "publish": {"dir": str(root / "repo"), "name": NAME, "onnx": onnx},
        }
    )
    t = Trainer(cfg, Metrics())
    t.setup(stream=False)
    x, y = samples(20 * spec.batch_size)
    for i in range(20):
        s = slice(i * spec.batch_size, (i + 1) * spec.batch_size)
        pos = {("bench", 0): ((i + 1) * spec.batch_size, 0)}
        t.step(Batch(torch.from_numpy(x[s]), torch.from_numpy(y[s]), pos))
        t.trained.update(pos)
    t.close()  # the final snapshot, published
    return t.step_count


def v2_request(rows) -> tuple[bytes, dict[str, str]]:
    """A v2 infer request as ``tritonclient.http`` sends it by default: binary FP32 features, binary outputs."""
    blob = rows.astype("<f4").tobytes()
    tensor = {"name": "features", "datatype": "FP32", "shape": list(rows.shape), "parameters": {"binary_data_size": len(blob)}}
    header = json.dumps({"inputs": [tensor], "parameters": {"binary_data_output": True}}).encode()
    # not a JSON content type (tritonclient sends none): kserve's route would parse the binary tail as JSON
    return header + blob, {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"}


def drive(port: int, batch: int, clients: int, requests: int, protocol: str = "v1") -> dict[str, float]:
    """``clients`` threads of ``requests`` posts each; latencies in ms, the rate over the whole run."""
    x, _ = samples(max(64, batch) * 4, seed=5)
    chunks = [x[i * batch : (i + 1) * batch] for i in range(4)]
    if protocol == "v2":
        path = f"/v2/models/{NAME}/infer"
        bodies = [v2_request(c) for c in chunks]
    else:
        path = f"/v1/models/{NAME}:predict"
        bodies = [(json.dumps({"instances": [dict(zip(FEATURES, map(float, r))) for r in c]}).encode(), {}) for c in chunks]
    latencies: list[list[float]] = [[] for _ in range(clients)]
    failures = [0] * clients
    go = threading.Barrier(clients + 1, timeout=60)  # a client that fails to warm up breaks it: no wait for ever

    def run(i: int) -> None:
        c = Client(port)
        try:
            code, doc = c.request("POST", path, raw=bodies[0][0], headers=bodies[0][1])  # connect and warm up outside the timing
            assert code == 200, f"{path}: {code} {doc}"
        except BaseException:
            go.abort()
            raise
        go.wait()
        for n in range(requests):
            t0 = time.perf_counter()
            body, headers = bodies[n % 4]
            code, _doc = c.request("POST", path, raw=body, headers=headers)
            latencies[i].append(time.perf_counter() - t0)
            failures[i] += code != 200
        c.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for th in threads:
        th.start()
    go.wait()
    started = time.perf_counter()
    for th in threads:
        th.join()
    seconds = time.perf_counter() - started
    flat = sorted(v for lat in latencies for v in lat)
    q = statistics.quantiles(flat, n=100)
    return {
        "rps": len(flat) / seconds,
        "p50": q[49] * 1e3,
        "p99": q[98] * 1e3,
        "requests": len(flat),
        "failed": sum(failures),
    }


FORWARD_MODELS = {"linear": {}, "mlp": {"hidden": [64]}, "transformer": {}}


def forward(models: list[str], batches: list[int], calls: int, repeat: int = 3) -> list[list[str]]:
    """Microseconds per forward pass of the served module (standardization included), torch against onnxruntime, one thread.

    The module ``streamtrain serve`` runs (``Served``, random weights: speed does not depend on them) and its ONNX
    export (``models/onnx_export.py``, checked against torch first); the best of ``repeat`` runs of ``calls`` calls.
    """
    import onnxruntime as ort

    from streamtrain.models.onnx_export import export_onnx
    from streamtrain.models.registry import Inputs, build_model
    from streamtrain.models.served import Served

    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as tmp:
        for name in models:
            model = build_model(name, FORWARD_MODELS[name], Inputs(WIDTH)).eval()
            module = Served(model, torch.zeros(WIDTH), torch.ones(WIDTH)).eval()
            path = Path(tmp) / f"{name}.onnx"
            export_onnx(module, path, WIDTH, 0, 0)
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            for batch in batches:
                x = torch.randn(batch, WIDTH)
                feed = {session.get_inputs()[0].name: x.numpy()}

                def torch_call(x=x, module=module):
                    with torch.inference_mode():
                        module(x)

                def onnx_call(feed=feed, session=session):
                    session.run(None, feed)

                times = {}
                for label, call in (("torch", torch_call), ("onnxruntime", onnx_call)):
                    for _ in range(50):
                        call()
                    best = float("inf")
                    for _ in range(repeat):
                        t0 = time.perf_counter()
                        for _ in range(calls):
                            call()
                        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
                    times[label] = best
                rows.append(
                    [
                        name,
                        str(batch),
                        f"{times['torch']:.1f}",
                        f"{times['onnxruntime']:.1f}",
                        f"{times['torch'] / times['onnxruntime']:.2f}x",
                    ]
                )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=2000, help="requests per client (default 2000)")
    ap.add_argument("--batches", default="1,64", help="instances per request, comma-separated (default 1,64)")
    ap.add_argument("--clients", default="1,4", help="client threads, comma-separated (default 1,4)")
    ap.add_argument("--threads", type=int, default=1, help="the server's --threads (torch intra-op threads)")
    ap.add_argument("--protocols", default="v1", help="v1 (:predict, JSON instances), v2 (infer, binary tensors), or v1,v2")
    ap.add_argument(
        "--inline-max-bytes", type=int, help="the server's --inline-max-bytes (default: its own, 64 KiB; 0: a worker thread always)"
    )
    ap.add_argument(
        "--forward",
        action="store_true",
        help="only the served module's forward pass, torch against onnxruntime (linear, mlp, transformer; the onnx extra)",
    )
    ap.add_argument("--runtime", default="torch", choices=("torch", "onnx"), help="the server's --runtime (onnx: publishes ONNX too)")
    ap.add_argument(
        "--servers",
        default="fastapi",
        help="fastapi (this package's app), kserve (KServe's ModelServer, the kserve extra), or fastapi,kserve side by side",
    )
    ap.add_argument("--rounds", type=int, default=1, help="run each server this many times, in turn; keep the best (default 1)")
    ap.add_argument("--calls", type=int, default=2000, help="--forward: calls per timing (default 2000)")
    args = ap.parse_args(argv)
    quiet_logs()
    print_machine(machine())
    if args.forward:
        rows = forward(list(FORWARD_MODELS), [int(b) for b in args.batches.split(",")], args.calls)
        print(f"{WIDTH} features, one thread; microseconds per call, best of 3")
        print(table(["model", "batch", "torch us", "onnxruntime us", "torch / onnxruntime"], rows))
        return 0
    batches = [int(b) for b in args.batches.split(",")]
    clients = [int(c) for c in args.clients.split(",")]
    servers = args.servers.split(",")
    cases = [(p, b, c) for b in batches for c in clients for p in args.protocols.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        root = Path(tmp)
        version = publish(root, onnx=args.runtime == "onnx")
        extra = ["--inline-max-bytes", str(args.inline_max_bytes)] if args.inline_max_bytes is not None else []
        results: dict[str, dict] = {}
        for _round in range(args.rounds):  # servers in turn, round after round: a busy neighbour hits both
            for kind in servers:
                r = run_server(root, kind, args, extra, cases)
                best = results.get(kind)
                results[kind] = r if best is None else merge(best, r)
    inline = "default" if args.inline_max_bytes is None else args.inline_max_bytes
    print(f"model: mlp {MODELS['mlp'].params}, {WIDTH} features, version {version}")
    print(f"server: --threads {args.threads}, --inline-max-bytes {inline}, --runtime {args.runtime}; {args.rounds} round(s), best of them")
    head = ["server", "protocol", "batch", "clients", "requests", "requests/s", "rows/s", "p50 ms", "p99 ms", "failed"]
    rows = []
    for kind in servers:
        for case, r in results[kind]["cases"].items():
            protocol, batch, n = case
            rows.append(
                [
                    kind,
                    protocol,
                    str(batch),
                    str(n),
                    f"{r['requests']:,}",
                    f"{r['rps']:,.0f}",
                    f"{r['rps'] * batch:,.0f}",
                    f"{r['p50']:.2f}",
                    f"{r['p99']:.2f}",
                    str(r["failed"]),
                ]
            )
    print(table(head, rows))
    head = ["server", "start to ready s", "RSS ready MiB", "RSS after load MiB"]
    memory = [[k, f"{r['start']:.2f}", f"{r['rss_ready']:.0f}", f"{r['rss_after']:.0f}"] for k, r in ((k, results[k]) for k in servers)]
    print(table(head, memory))
    if len(servers) > 1:
        base, other = servers[0], servers[1]
        head = ["protocol", "batch", "clients", f"{other} / {base} requests/s", f"{other} / {base} p99"]
        ratios = []
        for case in cases:
            a, b = results[base]["cases"][case], results[other]["cases"][case]
            ratios.append([case[0], str(case[1]), str(case[2]), f"{b['rps'] / a['rps']:.2f}x", f"{b['p99'] / a['p99']:.2f}x"])
        print(table(head, ratios))
    return 0


def run_server(root: Path, kind: str, args: argparse.Namespace, extra: list[str], cases: list) -> dict:
    """One server process: its start time to ready, its RSS when ready and after the load, and each case's figures."""
    grpc = ["--grpc-port", str(free_port())] if kind == "kserve" else []
    server = ServeProcess(
        root / f"serve-{kind}.log",
        "--server",
        kind,
        "--repo",
        str(root / "repo"),
        "--name",
        NAME,
        "--threads",
        str(args.threads),
        "--runtime",
        args.runtime,
        *grpc,
        *extra,
    )
    try:
        start = server.wait_ready(path="/v2/health/ready", every=0.02)
        rss_ready = server.rss_mib()
        out = {case: drive(server.port, case[1], case[2], args.requests, case[0]) for case in cases}
        rss_after = server.rss_mib()
        assert server.terminate() == 0, server.log()[-2000:]
    finally:
        server.kill()
    return {"start": start, "rss_ready": rss_ready, "rss_after": rss_after, "cases": out}


def merge(a: dict, b: dict) -> dict:
    """The better of two rounds, case by case (the faster run; its latencies with it); the quicker start, the larger RSS."""
    cases = {c: a["cases"][c] if a["cases"][c]["rps"] >= b["cases"][c]["rps"] else b["cases"][c] for c in a["cases"]}
    return {
        "start": min(a["start"], b["start"]),
        "rss_ready": max(a["rss_ready"], b["rss_ready"]),
        "rss_after": max(a["rss_after"], b["rss_after"]),
        "cases": cases,
    }


if __name__ == "__main__":
    sys.exit(main())
