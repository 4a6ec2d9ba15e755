"""``streamtrain`` command line: ``run`` the daemon, ``check-config`` a file, ``produce`` files
into a topic, and look at or export ``snapshots``."""

from __future__ import annotations

import argparse
import sys

from daemon.config import Config, dump_config, load_config
from daemon.errors import ConfigError
from daemon.service import EXIT_CONFIG, run

SET_HELP = "override a config key, e.g. --set trainer.lr=0.01 (value read as YAML; repeatable; after STREAMTRAIN__* variables)"


def add_set_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE", help=SET_HELP)


def load_or_explain(path: str, overrides: list[str] | None = None) -> Config | None:
    """The validated config, or None after printing every problem to stderr."""
    try:
        return load_config(path, overrides or [])
    except ConfigError as exc:
        print(f"streamtrain: {path}: {len(exc.problems)} configuration problem(s):", file=sys.stderr)
        for p in exc.problems:
            print(f"  {p}", file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    from daemon import produce, snapshots_cli  # imported here: they use this module's helpers

    parser = argparse.ArgumentParser(prog="streamtrain", description="Train a PyTorch model online from Kafka topics.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run the daemon until SIGTERM")
    p_run.add_argument("--config", "-c", required=True, help="YAML config file")
    add_set_argument(p_run)
    p_check = sub.add_parser("check-config", help="print the effective config, or every problem with its key path (exit 2)")
    p_check.add_argument("config", help="YAML config file")
    add_set_argument(p_check)
    produce.add_parser(sub)
    snapshots_cli.add_parser(sub)
    args = parser.parse_args(argv)

    if args.command == "produce":
        return produce.main(args)
    if args.command == "snapshots":
        return snapshots_cli.main(args)
    cfg = load_or_explain(args.config, args.overrides)
    if cfg is None:
        return EXIT_CONFIG
    if args.command == "check-config":
        sys.stdout.write(dump_config(cfg))
        return 0
    return run(cfg)


if __name__ == "__main__":
    sys.exit(main())
