"""Coverage-guided fuzzing of every parser of producer and client bytes: ``python -m bench.fuzz``.

``python -m bench.fuzz --format csv --seconds 600`` runs atheris (libFuzzer for Python; the
``fuzz`` extra) on one target for that long; ``--format all`` runs each target in turn.
A target is a decoder (json, json-vector, csv, arrow, raw) or the serving body parser
(serve).  For a decoder, the fuzzer's input is split at ``SEP`` into records, put between
two good ones, and decoded as one batch; what bench/hostile.py's :func:`check_batch` asserts
must hold (nothing raises, every message accounted for once, the batch is its records),
else it is a finding.  For serving, the input is the request body: anything but an
``InputError`` is a finding.  The project's Python code is instrumented for coverage;
pyarrow's and msgspec's C code is exercised but not instrumented, so the fuzzer cannot
steer into it, only hit it.

It prints, per target: seconds, executions, executions/s, findings; the inputs of the
findings are written under ``--out`` (default ``bench-out/fuzz/<target>/``).  A finding
becomes a regression case in tests/ (tests/test_decode.py, tests/test_fuzz.py) with the fix.
It is a long run by hand, not part of ``make test``: docs/RELIABILITY.md gives the last one.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS = ("json", "json-vector", "csv", "arrow", "raw", "serve")
SEP = b"\xfe\xfe\xfe\xfe"  # between records in one input


def seeds(target: str) -> list[bytes]:
    """The start of the corpus: good records, the named hostile kinds (small enough), good ones side by side."""
    from bench.hostile import good, kinds

    if target == "serve":
        return [
            b'{"instances": [{"a": 1, "b": 2, "c": 3, "user": "u1"}, {"a": null, "b": true, "c": 3, "user": 7}]}',
            b'{"instances": [[1e400, 0, 0]]}',
            b'{"instances": [{"a": "1", "b": null, "c": true}]}',
            b"[" * 50 + b"]" * 50,
        ]
    out = [good(target, 1), good(target, 2) + SEP + good(target, 3)]
    out += [v for v in kinds(target).values() if v is not None and 0 < len(v) < 8192]
    return out


def _records(target: str, data: bytes) -> list[bytes | None]:
    from bench.hostile import good

    return [good(target, 1), *data.split(SEP), good(target, 2)]


def child(target: str, argv: list[str]) -> None:
    """The fuzzing process: libFuzzer runs TestOneInput until -max_total_time."""
    import atheris

    with atheris.instrument_imports(include=["streamtrain", "bench.hostile"]):
        if target == "serve":
            from streamtrain.serve.app import _predict
            from streamtrain.serve.model import InputError
        else:
            import streamtrain.streams.config
            import streamtrain.streams.decode  # noqa: F401 -- imported here so that its code is instrumented
            from bench.hostile import check_batch, decoder

    if target == "serve":
        model = _ServeStub()

        def test_one(data: bytes) -> None:
            try:
                _predict(model, data, 64)
            except InputError:
                pass

    else:
        dec = decoder(target)

        def test_one(data: bytes) -> None:
            check_batch(target, dec, _records(target, data))

    atheris.Setup([sys.argv[0], *argv], test_one)
    atheris.Fuzz()


class _ServeStub:
    """What the body parser reads of a served model (numbers, a categorical field, missing imputed), no torch needed."""

    width = 3
    features = ("a", "b", "c")
    feature_field = None
    version = 1
    impute = True
    classes = ()

    def __init__(self) -> None:
        from streamtrain.streams.features import FeatureSpec

        self.fields = FeatureSpec(numbers=self.features, categorical=("user",), buckets=1000)

    def predict(self, x, ids=None, probabilities=False):
        return [float(v) for v in (x.sum(axis=1) + ids.sum(axis=1))]


def run(target: str, seconds: int, out: Path) -> dict[str, object]:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{target}-") as corpus:
        for i, seed in enumerate(seeds(target)):
            (Path(corpus) / f"seed-{i}").write_bytes(seed)
        args = [
            f"-max_total_time={seconds}",
            "-rss_limit_mb=4096",
            "-max_len=65536",
            "-timeout=20",
            f"-artifact_prefix={out}/",
            "-print_final_stats=1",
            corpus,
        ]
        started = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "bench.fuzz", "--child", target, "--", *args], capture_output=True, text=True)
        wall = time.monotonic() - started
    log = proc.stderr
    (out / "fuzz.log").write_text(log)
    runs = re.findall(r"stat::number_of_executed_units:\s*(\d+)", log) or re.findall(r"Done (\d+) runs", log)
    findings = sorted({m for m in re.findall(r"Test unit written to (\S+)", log)})
    execs = int(runs[-1]) if runs else 0
    return {"target": target, "seconds": round(wall), "executions": execs, "per_s": execs / wall if wall else 0.0, "findings": findings}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--format", default="all", help=f"one of {', '.join(TARGETS)}, or all (default)")
    ap.add_argument("--seconds", type=int, default=600, help="per target (default 600)")
    ap.add_argument("--out", type=Path, default=Path("bench-out/fuzz"), help="where findings and logs go")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()
    if args.child:
        child(args.child, [a for a in rest if a != "--"])
        return
    try:
        import atheris  # noqa: F401
    except ImportError:
        sys.exit("atheris is not installed: pip install 'streamtrain[fuzz]' (or .venv/bin/pip install atheris)")
    from bench.common import machine, print_machine

    print_machine(machine())
    targets = TARGETS if args.format == "all" else tuple(args.format.split(","))
    rows = []
    for target in targets:
        if target not in TARGETS:
            sys.exit(f"unknown target {target!r}; one of {', '.join(TARGETS)}")
        r = run(target, args.seconds, args.out / target)
        rows.append(r)
        print(
            f"{target}: {r['executions']:,} executions in {r['seconds']} s ({r['per_s']:,.0f}/s), {len(r['findings'])} finding(s)",
            flush=True,
        )
        for f in r["findings"]:
            print(f"  finding: {f}")
    print()
    print("| target | seconds | executions | executions/s | findings |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['target']} | {r['seconds']} | {r['executions']:,} | {r['per_s']:,.0f} | {len(r['findings'])} |")


if __name__ == "__main__":
    main()
