"""Candidate configs: ``trainer.candidates``' overrides applied to the config, checked like the file.

Used by ``daemon/candidates.py`` to build the learners and by the config check, so a bad
candidate is an invalid config (exit 2) before anything starts.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from streamtrain.streams.config import parse
from streamtrain.streams.errors import ConfigError

DEFAULT = "default"


def candidate_configs(cfg: Any) -> list[tuple[str, Any]]:
    """The default config and one per ``trainer.candidates`` entry, named by its overrides; every problem at once."""
    out = [(DEFAULT, cfg)]
    problems: list[str] = []
    for i, overrides in enumerate(cfg.trainer.candidates):
        try:
            out.append((name_of(overrides), with_overrides(cfg, overrides, f"trainer.candidates[{i}]")))
        except ConfigError as exc:
            problems += exc.problems
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        problems.append("trainer.candidates: two candidates are the same")
    if problems:
        raise ConfigError(problems)
    return out


def name_of(overrides: dict[str, Any]) -> str:
    """``lr=0.01,hidden=[128]``: the overrides' last path parts and values."""
    parts = []
    for path, value in overrides.items():
        v = "[" + ",".join(map(_text, value)) + "]" if isinstance(value, (list, tuple)) else _text(value)
        parts.append(f"{path.rsplit('.', 1)[-1]}={v}")
    return ",".join(parts) or DEFAULT


def _text(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def with_overrides(cfg: Any, overrides: dict[str, Any], where: str) -> Any:
    """``cfg`` with ``overrides`` (dotted paths under trainer. or model.) applied and checked like the file."""
    raw = {"trainer": _plain(dataclasses.asdict(cfg.trainer)), "model": _plain(dataclasses.asdict(cfg.model))}
    raw["trainer"].pop("candidates", None)
    problems = []
    for path, value in overrides.items():
        parts = str(path).split(".")
        if parts[0] not in raw or len(parts) < 2:
            problems.append(f"{where}: {path}: a candidate differs in trainer.* or model.* only")
            continue
        node = raw[parts[0]]
        if parts[:2] == ["model", "params"] and len(parts) > 2:
            node = node.setdefault("params", {})
            node[".".join(parts[2:])] = value
            continue
        for part in parts[1:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    if problems:
        raise ConfigError(problems)
    from streamtrain.config.schema import ModelConfig, TrainerConfig, _model_problems

    try:
        trainer = parse(TrainerConfig, raw["trainer"], f"{where}.trainer")
        model = parse(ModelConfig, raw["model"], f"{where}.model")
    except ConfigError as exc:
        raise ConfigError(exc.problems) from None
    out = dataclasses.replace(cfg, trainer=dataclasses.replace(trainer, candidates=()), model=model)
    if trainer.task != cfg.trainer.task:
        raise ConfigError([f"{where}: trainer.task: every candidate learns the same task"])
    bad = _model_problems(out)
    if bad:
        raise ConfigError([f"{where}.{k}: {m}" for k, m in bad])
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value
