"""Config overrides from ``STREAMTRAIN__*`` environment variables and ``--set key.path=value``.

Both are applied to the raw YAML mapping before validation (file < environment <
``--set``), so a bad override is reported exactly like a bad line in the file:
``trainer.lr: must be > 0, got -1``, ``kafka.topcs: unknown key; did you mean 'topics'?``.

* ``--set trainer.lr=0.01``, ``--set kafka.topics=[a,b]``: the value is read as YAML
  (``0.01`` a number, ``[a,b]`` a list, ``'007'`` a string).
* ``STREAMTRAIN__TRAINER__LR=0.01``: ``__`` separates the parts of the path, which is
  lowercased; the value is read as YAML too.
* Under a free-form mapping (``kafka.settings``, ``model.params``) the rest of the path
  is one key, so librdkafka's dotted names need no quoting:
  ``--set kafka.settings.sasl.mechanisms=SCRAM-SHA-512`` sets ``sasl.mechanisms``, and
  ``STREAMTRAIN__KAFKA__SETTINGS__SASL__MECHANISMS`` does the same.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterable, Mapping
from typing import Any

import yaml

from streamtrain.streams.errors import ConfigError

__all__ = ["ENV_PREFIX", "Override", "apply_overrides", "env_overrides", "parse_set"]

ENV_PREFIX = "STREAMTRAIN__"

Override = tuple[tuple[str, ...], Any, str]  # path, value, where it came from (for messages)


def parse_set(items: Iterable[str], schema: type) -> list[Override]:
    """``--set key.path=value`` arguments as overrides; raises ConfigError for a malformed one."""
    out, problems = [], []
    for item in items:
        path_text, eq, value_text = item.partition("=")
        if not eq:
            problems.append(f"--set {item}: must be key.path=value, e.g. --set trainer.lr=0.01")
            continue
        parts = path_text.strip().split(".")
        if not all(parts):
            problems.append(f"--set {item}: {path_text.strip()!r} is not a key path (empty part); e.g. --set trainer.lr=0.01")
            continue
        value, problem = _yaml_value(value_text)
        if problem:
            problems.append(f"--set {item}: {problem}")
            continue
        out.append((_join_free(parts, schema), value, f"--set {item}"))
    if problems:
        raise ConfigError(problems)
    return out


def env_overrides(environ: Mapping[str, str], schema: type) -> list[Override]:
    """Overrides from ``STREAMTRAIN__SECTION__KEY=value`` variables, in name order."""
    out, problems = [], []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX):
            continue
        parts = name[len(ENV_PREFIX) :].lower().split("__")
        if not all(parts):
            problems.append(f"{name}: not a key path (empty part between '__'); e.g. STREAMTRAIN__TRAINER__LR=0.01")
            continue
        value, problem = _yaml_value(environ[name])
        if problem:
            problems.append(f"{name}: {problem}")
            continue
        out.append((_join_free(parts, schema), value, name))
    if problems:
        raise ConfigError(problems)
    return out


def apply_overrides(raw: Any, overrides: Iterable[Override]) -> Any:
    """A copy of ``raw`` with each override set in turn (later ones win); missing sections are created."""
    raw = _copy(raw) if raw is not None else {}
    if not isinstance(raw, dict):
        return raw  # the validator reports the top level; overrides have nowhere to go
    problems = []
    for path, value, origin in overrides:
        node = raw
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                where = ".".join(path[: i + 1])
                problems.append(f"{origin}: {where} is {type(child).__name__} in the config, not a section; cannot set {'.'.join(path)}")
                break
            node = child
        else:
            node[path[-1]] = value
    if problems:
        raise ConfigError(problems)
    return raw


def _yaml_value(text: str) -> tuple[Any, str | None]:
    try:
        return yaml.safe_load(text) if text.strip() else "", None
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return None, f"value {text!r} is not valid YAML ({first}); quote a string that starts with [ {{ or '"


def _join_free(parts: list[str], schema: type) -> tuple[str, ...]:
    """Keep the path past a free-form mapping field (``kafka.settings``) as one dotted key."""
    cls: Any = schema
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(cls):
            return tuple(parts)
        hints = typing.get_type_hints(cls)
        fields = {f.name for f in dataclasses.fields(cls)}
        if part not in fields:
            return tuple(parts)  # the validator names the unknown key
        tp = hints[part]
        if typing.get_origin(tp) is dict and i + 1 < len(parts):
            return (*parts[: i + 1], ".".join(parts[i + 1 :]))
        cls = tp
    return tuple(parts)


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value
