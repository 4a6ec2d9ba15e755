"""How fast the data path fills the ring with nothing training: ``python -m bench.ingest``.

For each format, fraction of bad records and number of ingest workers
(``ring.ingest_workers``), on a topic of the embedded broker filled
beforehand, the daemon's own data path (``KafkaIterableDataset`` with the daemon's
settings: consume, decode, dead-letter the rejects, place into the shared ring) is read
by a loop that releases each batch at once.  It prints rows/s over the window that
starts after the first ``--warmup`` rows, and how many records went to the dead-letter
topic.  Compare figures only within one run: the machine is shared, so only the ratios
travel.

A bad record is one the decoder rejects (JSON that does not parse, a CSV line with the
wrong number of fields, a raw record of the wrong length); it is spread evenly, so at
``--bad 0.01`` nearly every consumed batch holds one.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import io
import json
import math
import tempfile
import time
from pathlib import Path

from bench.common import (
    MODELS,
    ROWS,
    Broker,
    CpuMeter,
    daemon_config,
    fill_topic,
    fmt_rate,
    machine,
    print_machine,
    quiet_logs,
    records,
    table,
    unique,
)
from streamtrain.streams.dataset import KafkaIterableDataset
from streamtrain.streams.decode import LabelRule, make_decoder
from streamtrain.streams.encode import FORMATS

# Formats of the decode-only table with a schema (unframed records, data.schema): the fields of the json rows.
SCHEMA_FORMATS = ("avro", "protobuf")

BAD_VALUE = {
    "json": b"{not json",
    "csv": b"1,2",
    "raw": b"\x00\x01\x02",
    "arrow": b"not arrow",
    "json-8": b"{not json",
    "json-4+4ids": b"{not json",
    "avro": b"\x02",  # a union index past the end, then nothing: cut short
    "protobuf": b"\xff\xff",  # a field tag cut short
}


def with_bad(values: list[bytes], fmt: str, fraction: float) -> tuple[list[bytes], int]:
    """Every ``1/fraction``-th record replaced by one the decoder rejects."""
    if fraction <= 0:
        return values, 0
    every = max(1, round(1 / fraction))
    out = list(values)
    for i in range(every // 2, len(out), every):
        out[i] = BAD_VALUE[fmt]
    return out, len(range(every // 2, len(out), every))


def ingest_only(cfg, rows: int, warmup: int, timeout: float = 300.0) -> dict[str, float]:
    """Read ``warmup + rows`` rows through the data path, releasing each batch at once."""
    ds = KafkaIterableDataset(cfg.kafka, cfg.data, cfg.ring, cfg.dead_letter, LabelRule.of(cfg.trainer))
    got = taken = 0
    t0 = s0 = None
    cpu = CpuMeter()
    deadline = time.monotonic() + timeout
    try:
        ds.start()
        while got < warmup + rows and time.monotonic() < deadline:
            batch = ds.next_batch(timeout=5.0)
            if batch is None:
                break
            got += len(batch)
            taken += 1
            if t0 is None and got >= warmup:
                t0, s0 = time.perf_counter(), got
                cpu.start()
        seconds = time.perf_counter() - t0 if t0 is not None else math.nan
        used = cpu.stop() if t0 is not None else {}
        # the counters come with the ingest process's status: wait for one sent after the last batch taken
        # (a batch is announced only once its rejects are in the dead-letter topic)
        settled = time.monotonic() + 5.0
        while time.monotonic() < settled:
            ds.pump()
            if ds.stats.batches >= taken:
                break
            time.sleep(0.05)
        return {
            "rows": got - (s0 or 0),
            "seconds": seconds,
            "rate": (got - (s0 or 0)) / seconds if t0 is not None else math.nan,
            "dead_lettered": ds.dead_letter_counts[0],
            "rejected": sum(ds.stats.rejected.values()),
            **used,
        }
    finally:
        ds.close()


def decode_only(formats: list[str], fractions: list[float], n: int, repeat: int) -> int:
    """The decoder alone, in this process: ns per record over batches of ``kafka.consume_batch`` records."""
    spec = MODELS["mlp"]
    rows_out = []
    tmp = tempfile.TemporaryDirectory()
    for fmt in formats:
        if fmt in SCHEMA_FORMATS:
            cfg = daemon_config("127.0.0.1:1", "unused", "json", spec, "unused")
            data, base = schema_records(fmt, n, Path(tmp.name), cfg.data)
            decoder = make_decoder(data, LabelRule.of(cfg.trainer))
        else:
            cfg = daemon_config("127.0.0.1:1", "unused", fmt, spec, "unused")
            decoder = make_decoder(cfg.data, LabelRule.of(cfg.trainer))
            base = records(fmt, n)
        batch = cfg.kafka.consume_batch
        for frac in fractions:
            values, bad = with_bad(base, fmt, frac)
            best = math.inf
            for _ in range(repeat):
                t0 = time.perf_counter()
                for i in range(0, len(values), batch):
                    decoder.decode(values[i : i + batch])
                best = min(best, (time.perf_counter() - t0) / len(values))
            rows_out.append([fmt, f"{100 * frac:g} %", f"{len(values):,}", f"{bad:,}", f"{best * 1e9:,.0f}"])
            print(f"{fmt} bad={frac:g}: {best * 1e9:,.0f} ns/record", flush=True)
    tmp.cleanup()
    print()
    print(table(["format", "bad", "records", "bad records", "decode ns/record (best)"], rows_out))
    return 0


def schema_records(fmt: str, n: int, tmp: Path, json_data) -> tuple[object, list[bytes]]:
    """The json rows' records (the same numbers and label) as unframed Avro or Protobuf, and the data config to read them."""
    names = [*json_data.features, json_data.label]
    rows = [dict(zip(names, row)) for row in (json.loads(v) for v in records("json", n)) for row in [[row[k] for k in names]]]
    if fmt == "avro":
        import fastavro

        schema = {"type": "record", "name": "Row", "fields": [{"name": k, "type": "double"} for k in names]}
        (tmp / "row.avsc").write_text(json.dumps(schema))
        parsed = fastavro.parse_schema(schema)
        values = []
        for r in rows:
            buf = io.BytesIO()
            fastavro.schemaless_writer(buf, parsed, r)
            values.append(buf.getvalue())
        path = tmp / "row.avsc"
    else:
        from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

        fd = descriptor_pb2.FileDescriptorProto(name="row.proto", package="bench", syntax="proto3")
        msg = fd.message_type.add(name="Row")
        for number, k in enumerate(names, 1):
            msg.field.add(name=k, number=number, type=descriptor_pb2.FieldDescriptorProto.TYPE_DOUBLE)
        pool = descriptor_pool.DescriptorPool()
        pool.Add(fd)
        cls = message_factory.GetMessageClass(pool.FindMessageTypeByName("bench.Row"))
        values = [cls(**r).SerializeToString() for r in rows]
        path = tmp / "row.desc"
        path.write_bytes(descriptor_pb2.FileDescriptorSet(file=[fd]).SerializeToString())
    return dataclasses.replace(json_data, format=fmt, schema=str(path)), values


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--formats",
        default="json,csv,raw",
        help="comma-separated: json,csv,arrow,raw, and json-8,json-4+4ids (JSON of 8 numbers, or 4 numbers and 4 string ids); "
        "with --decode-only also avro,protobuf (the json rows' fields, unframed)",
    )
    ap.add_argument("--bad", default="0,0.01", help="comma-separated fractions of bad records (default 0,0.01)")
    ap.add_argument("--workers", default="1", help="comma-separated ingest worker counts, e.g. 1,2 (default 1)")
    ap.add_argument("--samples", type=int, default=200_000, help="rows per measured window")
    ap.add_argument("--repeat", type=int, default=1, help="runs per cell; the best is kept")
    ap.add_argument("--quick", action="store_true", help="a tenth of the samples: checks that it runs")
    ap.add_argument("--bootstrap", help="an existing broker instead of the embedded one")
    ap.add_argument("--decode-only", action="store_true", help="time the decoder alone, in this process (no broker)")
    args = ap.parse_args(argv)
    formats = [f for f in args.formats.split(",") if f]
    fractions = [float(b) for b in args.bad.split(",") if b]
    worker_counts = [int(w) for w in args.workers.split(",") if w]
    unknown = [f for f in formats if f not in FORMATS and f not in ROWS and f not in SCHEMA_FORMATS]
    if unknown:
        ap.error(f"unknown format(s) {unknown}")
    if not args.decode_only and set(formats) & set(SCHEMA_FORMATS):
        ap.error("avro and protobuf are in the --decode-only table only (their records need a schema registry or data.schema)")
    quiet_logs()
    print_machine(machine())
    n = max(5_000, args.samples // 10) if args.quick else args.samples
    if args.decode_only:
        return decode_only(formats, fractions, n, max(1, args.repeat))
    warm = n // 5
    spec = MODELS["mlp"]
    rows_out = []
    with Broker(args.bootstrap) as broker:
        for fmt in formats:
            base = records(fmt, int((n + warm) * 1.1) + 2_000)
            for frac in fractions:
                topic = unique(f"bench-ingest-{fmt}")
                values, bad = with_bad(base, fmt, frac)
                fill_topic(broker.bootstrap, topic, values)
                del values
                gc.collect()
                best: dict[int, dict] = {}
                for _ in range(args.repeat):  # the worker counts interleaved: side by side
                    for w in worker_counts:
                        kafka = {"group_id": unique("bench-ingest")}
                        cfg = daemon_config(broker.bootstrap, topic, fmt, spec, "unused", kafka=kafka, ring={"ingest_workers": w})
                        r = ingest_only(cfg, n, warm)
                        if w not in best or r["rate"] > best[w]["rate"]:
                            best[w] = r
                        print(
                            f"{fmt} bad={frac:g} workers={w}: {fmt_rate(r['rate'])} rows/s, {r['dead_lettered']} dead-lettered", flush=True
                        )
                one = best[worker_counts[0]]["rate"]
                for w in worker_counts:
                    b = best[w]
                    rows_out.append(
                        [
                            fmt,
                            f"{100 * frac:g} %",
                            str(w),
                            f"{bad:,}",
                            fmt_rate(b["rate"]),
                            f"{b['rate'] / one:.2f}x",
                            f"{b['dead_lettered']:,}",
                            f"{b['self_cpu'] / b['rows'] * 1e6:.2f}" if b.get("self_cpu") else "-",
                        ]
                    )
            del base
    print()
    headers = ["format", "bad", "workers", "bad records in topic", "rows/s", f"x {worker_counts[0]} worker(s)", "dead-lettered"]
    print(table([*headers, "CPU us/row (reader + ingest processes)"], rows_out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
