"""``streamtrain`` command line: ``run`` the daemon, ``check-config`` a file, ``produce`` files
into a topic, look at or export ``snapshots``, and ``serve`` a published model."""

from __future__ import annotations

import argparse
import sys

from streamtrain.config.args import add_set_argument, load_or_explain
from streamtrain.config.schema import dump_config
from streamtrain.daemon import launch
from streamtrain.serve import server
from streamtrain.tools import produce, snapshots

EXIT_CONFIG = 2  # daemon/service.py's; torch is imported only by the commands that need it (`run`, `serve`, `snapshots export`)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="streamtrain", description="Train a PyTorch model online from Kafka topics.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run the daemon until SIGTERM (several ranks: --nproc-per-node)")
    p_run.add_argument("--config", "-c", required=True, help="YAML config file")
    add_set_argument(p_run)
    launch.add_arguments(p_run)
    p_check = sub.add_parser("check-config", help="print the effective config, or every problem with its key path (exit 2)")
    p_check.add_argument("config", help="YAML config file")
    add_set_argument(p_check)
    produce.add_parser(sub)
    snapshots.add_parser(sub)
    server.add_parser(sub)
    args = parser.parse_args(argv)

    if args.command == "produce":
        return produce.main(args)
    if args.command == "snapshots":
        return snapshots.main(args)
    if args.command == "serve":
        return server.main(args)
    cfg = load_or_explain(args.config, args.overrides)
    if cfg is None:
        return EXIT_CONFIG
    if args.command == "check-config":
        sys.stdout.write(dump_config(cfg))
        return 0
    if launch.requested(args):
        return launch.launch(args, cfg)
    from streamtrain.daemon.service import run

    return run(cfg)


if __name__ == "__main__":
    sys.exit(main())
