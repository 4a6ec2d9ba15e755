"""What every command that reads a config file shares: ``--set`` and printing every problem."""

from __future__ import annotations

import argparse
import sys

from streamtrain.config.schema import Config, load_config
from streamtrain.streams.errors import ConfigError

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
