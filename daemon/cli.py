"""``streamtrain`` command line: ``run`` the daemon, ``check-config`` a file."""

from __future__ import annotations

import argparse
import sys

from daemon.config import dump_config, load_config
from daemon.errors import ConfigError
from daemon.service import EXIT_CONFIG, run


def _load_or_explain(path: str):
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"streamtrain: {path}: {len(exc.problems)} configuration problem(s):", file=sys.stderr)
        for p in exc.problems:
            print(f"  {p}", file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="streamtrain", description="Train a PyTorch model online from Kafka topics.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run the daemon until SIGTERM")
    p_run.add_argument("--config", "-c", required=True, help="YAML config file")
    p_check = sub.add_parser("check-config", help="print the effective config, or every problem with its key path (exit 2)")
    p_check.add_argument("config", help="YAML config file")
    args = parser.parse_args(argv)

    cfg = _load_or_explain(args.config)
    if cfg is None:
        return EXIT_CONFIG
    if args.command == "check-config":
        sys.stdout.write(dump_config(cfg))
        return 0
    return run(cfg)


if __name__ == "__main__":
    sys.exit(main())
