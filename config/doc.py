"""Documentation generated from the config definitions, so it cannot drift from them.

``python -m streamtrain.config.doc yaml`` writes ``config/default.yaml`` (every key with its
default and a comment); ``python -m streamtrain.config.doc markdown`` writes the reference
table in ``docs/CONFIG.md``.  A test regenerates both and fails when they differ.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from typing import Any

import yaml

from streamtrain.config.schema import Config

HEADER = """\
# streamtrain: every configuration key, its default, and what it does.
# Generated from the config definitions by `python -m streamtrain.config.doc yaml`;
# edit config/schema.py or streams/config.py, not this file.
# Check a config with `streamtrain check-config FILE`; run with `streamtrain run --config FILE`.
"""


def _fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()


def _yaml_value(value: Any) -> str:
    if isinstance(value, tuple):
        value = list(value)
    elif isinstance(value, dict):
        value = dict(value)  # a frozen section's mapping
    text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def to_yaml(cls: type = Config, indent: int = 0) -> str:
    lines = [HEADER] if indent == 0 else []
    pad = "  " * indent
    for f, tp in _fields(cls):
        doc = f.metadata.get("doc", "")
        if dataclasses.is_dataclass(tp):
            if indent == 0:
                lines.append("")
            lines.append(f"{pad}# {doc}")
            lines.append(f"{pad}{f.name}:")
            lines.append(to_yaml(tp, indent + 1))
        else:
            lines.append(f"{pad}{f.name}: {_yaml_value(_default(f))}  # {doc}")
    return "\n".join(lines) + ("\n" if indent == 0 else "")


def to_markdown(cls: type = Config, prefix: str = "") -> str:
    rows = []
    if not prefix:
        rows += ["| key | default | meaning |", "| --- | --- | --- |"]
    for f, tp in _fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            rows.append(f"| **`{key}`** | | {f.metadata.get('doc', '')} |")
            rows.append(to_markdown(tp, f"{key}."))
        else:
            doc = f.metadata.get("doc", "").replace("|", "\\|")
            rows.append(f"| `{key}` | `{_yaml_value(_default(f))}` | {doc} |")
    return "\n".join(rows) + ("\n" if not prefix else "")


def main(argv: list[str]) -> int:
    what = argv[1] if len(argv) > 1 else "yaml"
    sys.stdout.write(to_yaml() if what == "yaml" else to_markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
