"""``streamtrain snapshots list|show|export``: look at a snapshot directory and take models out of it.

Read-only: it takes no lock and moves nothing aside, so it is safe while the daemon
runs (snapshots are renamed into place whole; one pruned meanwhile is reported as gone).
``NAME`` is a snapshot directory name, ``latest`` (the newest that verifies), or a step.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from streamtrain.config.secrets import redacted
from streamtrain.daemon.errors import SnapshotError
from streamtrain.daemon.snapshot import STATE_FILE, SnapshotInfo, SnapshotStore

__all__ = ["add_parser", "main"]

# daemon/export.py's EXPORT_FORMATS, without importing torch for `list` and `show` (tests/test_snapshots_cli.py checks they agree)
EXPORT_FORMATS = ("state_dict", "program", "onnx")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_parser(sub: Any) -> None:
    from streamtrain.config.args import add_set_argument

    p = sub.add_parser("snapshots", help="list snapshots, show one, or export a model for serving (read-only)")
    cmds = p.add_subparsers(dest="action", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        where = q.add_mutually_exclusive_group(required=True)
        where.add_argument("--dir", "-d", help="snapshot directory")
        where.add_argument("--config", "-c", help="daemon config: its snapshot.dir")
        add_set_argument(q)

    q = cmds.add_parser(
        "list", help="every snapshot, newest first: step, time, samples, loss, metric, cumulative prequential loss and metric, offsets"
    )
    common(q)
    q.add_argument("--json", action="store_true", help="one JSON object per snapshot, one per line")
    q = cmds.add_parser("show", help="one snapshot's meta (positions, metrics, versions, redacted config) and whether it verifies")
    q.add_argument("name", help="snapshot name, step, or latest")
    common(q)
    q.add_argument("--json", action="store_true", help="as JSON")
    q = cmds.add_parser("export", help="write a snapshot's model weights (and a JSON sidecar) for a serving process")
    q.add_argument("name", help="snapshot name, step, or latest")
    q.add_argument("out", help="output file, e.g. model.pt (the JSON sidecar goes next to it as model.pt.json)")
    common(q)
    q.add_argument(
        "--format",
        choices=EXPORT_FORMATS,
        default="state_dict",
        help="state_dict: the model's weights for torch.load(weights_only=True); "
        "program: torch.export of standardization + model, no model code needed; "
        "onnx: the same as ONNX, checked with onnxruntime (the onnx extra) (default state_dict)",
    )


def main(args: argparse.Namespace) -> int:
    directory = _directory(args)
    if directory is None:
        return EXIT_USAGE
    store = SnapshotStore(directory)  # never lock(): the daemon may hold it
    if not directory.is_dir():
        print(f"streamtrain snapshots: {directory}: no such directory", file=sys.stderr)
        return EXIT_FAILED
    try:
        if args.action == "list":
            return _list(store, args.json)
        info = _find(store, args.name)
        if args.action == "show":
            return _show(store, info, args.json)
        return _export(store, info, args.out, args.format)
    except SnapshotError as exc:
        print(f"streamtrain snapshots: {exc}", file=sys.stderr)
        return EXIT_FAILED


def _directory(args: argparse.Namespace) -> Path | None:
    if args.dir:
        if args.overrides:
            print("streamtrain snapshots: --set needs --config", file=sys.stderr)
            return None
        return Path(args.dir)
    from streamtrain.config.args import load_or_explain

    cfg = load_or_explain(args.config, args.overrides)
    return Path(cfg.snapshot.dir) if cfg is not None else None


def _find(store: SnapshotStore, name: str) -> SnapshotInfo:
    infos = store.list()
    if name == "latest":
        problems = []
        for info in infos:
            try:
                store.verify(info)
                return info
            except SnapshotError as exc:
                problems.append(f"{info.name}: {exc}")
        raise SnapshotError(f"no valid snapshot in {store.directory}" + (f" ({'; '.join(problems)})" if problems else ""))
    for info in infos:
        if name in (info.name, str(info.step)):
            return info
    known = ", ".join(i.name for i in infos[:5]) or "none"
    raise SnapshotError(f"no snapshot {name!r} in {store.directory}; newest: {known}")


# ---------------------------------------------------------------------------- list


def _list(store: SnapshotStore, as_json: bool) -> int:
    infos = store.list()
    if as_json:
        for info in infos:
            print(json.dumps(_row(info)))
        return EXIT_OK
    if not infos:
        print(f"no snapshots in {store.directory}")
        return EXIT_OK
    head = ("NAME", "STEP", "CREATED (UTC)", "SAMPLES", "LOSS_EWMA", "METRIC", "CUM_LOSS", "CUM_METRIC", "POSITIONS")
    rows = [head] + [_row_text(_row(i)) for i in infos]
    widths = [max(len(r[c]) for r in rows) for c in range(len(head) - 1)]
    for r in rows:
        print("  ".join(v.ljust(w) if c == 0 else v.rjust(w) for c, (v, w) in enumerate(zip(r, widths))) + "  " + r[-1])
    quarantined = sorted(p.name for p in store.directory.glob("corrupt-*"))
    if quarantined:
        print(f"({len(quarantined)} quarantined, not listed: {', '.join(quarantined)})")
    return EXIT_OK


def _row(info: SnapshotInfo) -> dict[str, Any]:
    m = info.meta
    return {
        "name": info.name,
        "step": info.step,
        "created": info.created,
        "samples": m.get("samples"),
        "loss_ewma": m.get("loss_ewma"),
        "metric": m.get("metric") or {},
        "prequential": m.get("prequential"),  # cumulative test-then-train metrics; None in snapshots older than them
        "positions": _positions(m),
    }


def _row_text(r: dict[str, Any]) -> tuple[str, ...]:
    metric = ", ".join(f"{k} {_num(v)}" for k, v in r["metric"].items()) or "-"
    positions = "; ".join(f"{t}: {n} partition(s), offsets sum {total:,}" for t, (n, total) in _by_topic(r["positions"]).items()) or "-"
    samples = f"{r['samples']:,}" if isinstance(r["samples"], int) else "-"
    preq = r["prequential"] or {}
    score = next((k for k in ("accuracy", "mae") if k in preq), None)
    cum_metric = f"{score} {_num(preq[score])}" if score else "-"
    return (
        r["name"],
        f"{r['step']:,}",
        _time(r["created"]),
        samples,
        _num(r["loss_ewma"]),
        metric,
        _num(preq.get("loss")),
        cum_metric,
        positions,
    )


def _prequential_text(preq: dict[str, Any] | None) -> str:
    """``1,280 samples: loss 0.1, mae 0.2, rmse 0.3`` (classifiers: and their calibration), or ``-`` for a snapshot older than them."""
    if not preq:
        return "-"
    samples = preq.get("samples")
    keys = ("loss", "accuracy", "mae", "rmse", "brier", "ece", "calibration_ratio", "normalized_entropy")
    scores = ", ".join(f"{k.replace('_', ' ')} {_num(preq[k])}" for k in keys if preq.get(k) is not None)
    return f"{samples:,} samples: {scores}" if isinstance(samples, int) else scores or "-"


def _positions(meta: dict) -> list[dict[str, Any]]:
    from streamtrain.streams.join.done import decode

    done = {(t, p): len(decode(first, bits)) for t, p, first, bits in meta.get("done") or []}  # data.labels
    out = []
    for entry in meta.get("positions") or []:
        topic, partition, offset, rows = entry
        row = {"topic": topic, "partition": partition, "offset": offset, "rows": rows}
        if "done" in meta:
            row["done_past"] = done.get((topic, partition), 0)
        out.append(row)
    return out


def _by_topic(positions: list[dict[str, Any]]) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    for p in positions:
        n, total = out.get(p["topic"], (0, 0))
        out[p["topic"]] = (n + 1, total + p["offset"])
    return out


# ---------------------------------------------------------------------------- show


def _show(store: SnapshotStore, info: SnapshotInfo, as_json: bool) -> int:
    try:
        store.verify(info)
        verified, problem = True, None
    except SnapshotError as exc:
        verified, problem = False, str(exc)
    m = info.meta
    doc = {
        **_row(info),
        "path": str(info.path),
        "verified": verified,
        "problem": problem,
        "model": m.get("model"),
        "versions": m.get("versions", {}),
        "config": _redact(m.get("config", {})),
    }
    if as_json:
        print(json.dumps(doc, indent=2))
        return EXIT_OK if verified else EXIT_FAILED

    def field(label: str, value: str) -> None:
        print(f"{label:<12} {value}")

    field("snapshot", info.name)
    field("path", str(info.path))
    field("verified", "ok (sizes and sha256 match the manifest)" if verified else "FAILED: " + str(problem))
    field("step", f"{info.step:,}")
    field("created", f"{_time(info.created)} UTC")
    field("samples", f"{doc['samples']:,}" if isinstance(doc["samples"], int) else "-")
    field("loss_ewma", _num(doc["loss_ewma"]))
    field("metric", ", ".join(f"{k} {_num(v)}" for k, v in doc["metric"].items()) or "-")
    field(
        "prequential",
        _prequential_text(doc["prequential"]) + (" (cumulative, each sample scored before it was trained)" if doc["prequential"] else ""),
    )
    field("model", str(doc["model"]))
    field("versions", ", ".join(f"{k} {v}" for k, v in doc["versions"].items()))
    field("positions", "(the next record to train, per partition; rows = rows of it already trained)")
    for p in doc["positions"]:
        done = f"  (+{p['done_past']:,} done past it: joined out of order)" if p.get("done_past") else ""
        print(f"  {p['topic']} [{p['partition']}]  offset {p['offset']:,}" + (f"  rows {p['rows']}" if p["rows"] else "") + done)
    field("config", "(secrets redacted)")
    print("  " + yaml.safe_dump(doc["config"], sort_keys=False).rstrip().replace("\n", "\n  "))
    return EXIT_OK if verified else EXIT_FAILED


def _redact(value: Any, key: str = "") -> Any:
    """Secrets redacted again on display, for snapshots written before redaction was complete."""
    if isinstance(value, dict):
        return {k: _redact(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v) for v in value]
    if isinstance(value, str) and value.startswith("${") and value.endswith("}"):
        return value  # a reference, already in place of the secret
    return redacted(value, key)


# ---------------------------------------------------------------------------- export


def _export(store: SnapshotStore, info: SnapshotInfo, out: str, fmt: str) -> int:
    import torch

    from streamtrain.daemon.export import export_model, sidecar_path

    store.verify(info)
    try:
        state = torch.load(info.path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # a file that verified but does not load: say so, do not move it
        raise SnapshotError(f"cannot load {info.name}/{STATE_FILE}: {(str(exc).splitlines() or [type(exc).__name__])[0]}") from exc
    spec = export_model(info, state, out, fmt)
    print(f"exported {info.name} (step {info.step:,}) as {fmt} to {out}; sidecar {sidecar_path(out)}")
    model = spec["model"]
    if fmt == "state_dict":
        print(f"  load: torch.load({out!r}, weights_only=True) into {model['class']} built with the sidecar's model.params")
        print("  inputs: standardize with the sidecar's inputs.standardize: x_std = (x - mean) * scale")
        if spec["outputs"]["task"] == "regression":
            print("  outputs: back to label units with the sidecar's outputs.destandardize: y = output * std + mean")
    else:
        print(f"  load: model = torch.export.load({out!r}).module()  # takes raw features; standardization included")
        if spec["outputs"]["task"] == "regression":
            print("  outputs: predictions in the label's units (the label's de-standardization is included)")
    return EXIT_OK


def _time(created: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(created))


def _num(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, (int, float)) else "-"
