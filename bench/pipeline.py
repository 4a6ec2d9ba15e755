"""How close the daemon's data path comes to compute-only training: ``python -m bench.pipeline``.

For each format (json, csv, arrow, raw) and model (a small MLP where the data path is
the bottleneck, the Transformer regressor where compute is), on topics of the embedded
broker filled beforehand, in one run on one machine:

- compute-only: ``Trainer.step`` on batches already in memory (the ceiling);
- raw consume: librdkafka reading the topic with the daemon's consumer settings, no decoding;
- naive loop: ``poll()`` one message, ``json.loads``, ``torch.tensor`` per record (JSON topic);
- e2e: the daemon's data path and training loop on the topic.

It prints one table: samples/s of each, E = e2e / compute-only two ways (the median over
the repeats of each compute-only run and the e2e run right after it: side by side; and the
best e2e against the model's best compute-only of the whole run: strict, the ceiling does
not depend on the format), the speedup over the
naive loop and the data-wait fraction from the daemon's ``streamtrain_data_wait_seconds``.
Snapshots are off during the runs (``snapshot.every_seconds: 0``).  Compare figures only
within one run: the machine is shared, so only the ratios travel.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import sys

import yaml

from bench.common import (
    MODELS,
    ROWS,
    Broker,
    daemon_config,
    fill_topic,
    fmt_rate,
    machine,
    print_machine,
    quiet_logs,
    records,
    rows_per_message,
    snapshot_dir,
    table,
    unique,
)
from bench.loops import compute_only, end_to_end, naive_loop, raw_consume
from streamtrain.streams.encode import FORMATS

# samples per measured window (after warmup), by model; --samples / --quick override
DEFAULT_SAMPLES = {"mlp": 300_000, "transformer": 40_000}
NAIVE_SAMPLES = {"mlp": 60_000, "transformer": 15_000}
QUICK = 0.1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--formats", default=",".join(FORMATS), help="comma-separated: json,csv,arrow,raw, json-8, json-4+4ids (4 numbers, 4 string ids)"
    )
    ap.add_argument("--models", default="mlp,transformer", help="comma-separated: mlp,transformer")
    ap.add_argument("--samples", type=int, default=0, help="samples per e2e/compute window (default: 300k mlp, 40k transformer)")
    ap.add_argument("--quick", action="store_true", help="a tenth of the samples: checks that it runs, figures are rough")
    ap.add_argument("--repeat", type=int, default=1, help="run each e2e/compute pair this many times and keep the best of each")
    ap.add_argument("--no-naive", action="store_true", help="skip the naive loop")
    ap.add_argument("--bootstrap", help="an existing broker instead of the embedded one")
    ap.add_argument("--ingest", default="process", help="comma-separated ring.ingest modes to run e2e with: process,thread")
    ap.add_argument("--ring", action="append", default=[], metavar="KEY=VALUE", help="a ring setting for e2e, e.g. slots=64 (repeatable)")
    args = ap.parse_args(argv)
    ring_settings = {}
    for item in args.ring:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--ring takes KEY=VALUE, got {item!r}")
        ring_settings[key] = yaml.safe_load(value)
    formats = [f for f in args.formats.split(",") if f]
    models = [m for m in args.models.split(",") if m]
    modes = [m for m in args.ingest.split(",") if m]
    if any(m not in ("process", "thread") for m in modes):
        ap.error(f"--ingest takes process and/or thread, got {args.ingest!r}")
    bad = [f for f in formats if f not in FORMATS and f not in ROWS] + [m for m in models if m not in MODELS]
    if bad:
        ap.error(f"unknown format(s)/model(s): {bad}")
    quiet_logs()
    info = machine()
    print_machine(info)

    def size(model: str, table_: dict[str, int]) -> int:
        n = args.samples or table_[model]
        return max(2_000, int(n * QUICK)) if args.quick else n

    results = []
    with Broker(args.bootstrap) as broker:
        # samples per topic: warmup + window + a margin so that it never runs dry inside a window
        n_records = int(max(size(m, DEFAULT_SAMPLES) for m in models) * 1.25) + 20_000
        topics = {}
        for fmt in sorted(set(formats) | ({"json"} if not args.no_naive else set())):
            topics[fmt] = unique(f"bench-{fmt}")
            values = records(fmt, n_records)
            print(f"filling {topics[fmt]}: {len(values):,} records ({n_records:,} samples, {fmt})", flush=True)
            fill_topic(broker.bootstrap, topics[fmt], values)
            del values
            gc.collect()
        raws = {}
        for fmt in formats:  # the same for both models: no model involved
            rpm = rows_per_message(fmt)
            cfg = daemon_config(broker.bootstrap, topics[fmt], fmt, MODELS[models[0]], "unused")
            raws[fmt] = raw_consume(cfg, n_records // rpm, rpm)
            print(f"{fmt}: raw consume {fmt_rate(raws[fmt].rate)} samples/s", flush=True)
        for key in models:
            spec = MODELS[key]
            n = size(key, DEFAULT_SAMPLES)
            warm = max(spec.batch_size * 20, n // 10)
            naive = None
            if not args.no_naive:
                d = snapshot_dir()
                naive = naive_loop(daemon_config(broker.bootstrap, topics["json"], "json", spec, d), size(key, NAIVE_SAMPLES), warm // 4)
                shutil.rmtree(d, ignore_errors=True)
                print(f"{key}: naive loop {fmt_rate(naive.rate)} samples/s", flush=True)
            for fmt, mode in [(f, m) for f in formats for m in modes]:
                best_c = best_e = None
                pairs = []
                for _ in range(args.repeat):
                    d = snapshot_dir()
                    cfg = daemon_config(broker.bootstrap, topics[fmt], fmt, spec, d)
                    c = compute_only(cfg, n, warm, fmt)
                    shutil.rmtree(d, ignore_errors=True)
                    d = snapshot_dir()
                    cfg = daemon_config(broker.bootstrap, topics[fmt], fmt, spec, d, ring={**ring_settings, "ingest": mode})
                    e = end_to_end(cfg, n, warm, broker_pid=broker.pid)
                    shutil.rmtree(d, ignore_errors=True)
                    pairs.append(e.rate / c.rate)
                    best_c = c if best_c is None or c.rate > best_c.rate else best_c
                    best_e = e if best_e is None or e.rate > best_e.rate else best_e
                raw = raws[fmt]
                eff = statistics.median(pairs)
                results.append((fmt, key, mode, best_c, raw, naive, best_e, eff))
                print(
                    f"{fmt}/{key}/{mode}: compute {fmt_rate(best_c.rate)}/s, raw consume {fmt_rate(raw.rate)}/s,"
                    f" e2e {fmt_rate(best_e.rate)}/s,"
                    f" E (pairs: {', '.join(f'{r:.2f}' for r in pairs)}) {eff:.2f}, data-wait {100 * best_e.wait_fraction:.1f} %,"
                    f" decode {1e9 * best_e.extra['decode_s_per_record']:.0f} ns/record,"
                    f" step {1e6 * best_e.extra['step_s']:.0f} us (compute-only {1e6 * best_c.extra['step_s']:.0f} us),"
                    f" CPU {1e6 * best_e.extra['self_cpu'] / best_e.samples:.2f} us/sample + broker"
                    f" {1e6 * best_e.extra['broker_cpu'] / best_e.samples:.2f}, other load {best_e.extra['other_cores']:.2f} cores",
                    flush=True,
                )
    # Two readings of E. Side by side: each compute-only run and the e2e run right after it
    # see the same machine; the median of those pairs shrugs off one disturbed window.
    # Strict: every row trains the same model on the same batch shape, so the ceiling is the
    # model's best compute-only of the whole run (a best of many windows against a best of
    # --repeat: it leans low when the machine's speed wanders during the run).
    ceiling = {key: max(r[3].rate for r in results if r[1] == key) for key in models}
    rows = []
    for fmt, key, mode, c, raw, naive, e, eff in results:
        rows.append(
            [
                fmt,
                key,
                mode,
                fmt_rate(c.rate),
                fmt_rate(raw.rate),
                fmt_rate(naive.rate) if naive else "-",
                fmt_rate(e.rate),
                f"{eff:.2f}",
                f"{e.rate / ceiling[key]:.2f}",
                f"{e.rate / naive.rate:.1f}x" if naive else "-",
                f"{100 * e.wait_fraction:.1f} %",
                f"{e.extra['other_cores']:.2f}",
            ]
        )
    headers = [
        "format",
        "model",
        "ingest",
        "compute-only",
        "raw consume",
        "naive loop",
        "e2e",
        "E, side by side",
        "E, strict",
        "x naive",
        "data-wait",
        "other load",
    ]
    print()
    print(table(headers, rows))
    print(
        "\nsamples/s, best of --repeat runs; E side by side = median over the runs of e2e / the compute-only run just before it;"
        "\nE strict = best e2e / the model's best compute-only in this run"
        f" ({', '.join(f'{k} {fmt_rate(v)}' for k, v in ceiling.items())});"
        "\nnaive loop = JSON records; raw consume counts samples (arrow: rows), no decoding;"
        "\nother load = cores busy with other processes during the e2e window (shared machine: above ~0.2 the ratios are pessimistic)."
    )
    print_machine(info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
