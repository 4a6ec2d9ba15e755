"""Secrets in the config: ``${env:NAME}`` and ``${file:/path}`` references, and redaction.

A password should not sit in a YAML file that is copied around, so any string value
(in the file, in ``STREAMTRAIN__*`` variables or in ``--set``) may name where the
secret lives instead: ``${env:KAFKA_PASSWORD}`` or ``${file:/run/secrets/kafka}``.
References are resolved when the config is loaded; a missing variable or unreadable
file is a config error with its key path.

A resolved value is a :class:`Secret`: a ``str`` (librdkafka takes it as is) that
remembers the reference it came from, so printing the config (``check-config``,
``meta.json`` of a snapshot) shows ``${env:KAFKA_PASSWORD}``, never the value.
Literal values under secret-looking keys (``sasl.password``, ``ssl.key.password``,
``*.secret``, ``*token*``, ...) are shown as ``***``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["REDACTED", "Secret", "is_secret_key", "redacted", "resolve_secrets"]

REDACTED = "***"
_REF = re.compile(r"\$\{([a-z]+):([^}]*)\}")

# A key is secret when one of its dot/underscore-separated words is one of these...
_SECRET_WORDS = {"password", "passwd", "passphrase", "secret", "token", "credentials", "apikey", "key"}
# ...unless its last word says it names a place or a size, not the secret itself
# (ssl.key.location is a path; ssl.key.password and ssl.key.pem are secrets).
_NOT_SECRET_LAST = {"location", "path", "file", "dir", "id", "name", "dim", "size", "len", "length", "type", "count", "field"}
# Secret though no word says so.
_SECRET_KEYS = {"sasl.oauthbearer.config", "sasl.jaas.config"}


class Secret(str):
    """A value resolved from a ``${...}`` reference; shown as the reference, never the value."""

    ref: str

    def __new__(cls, value: str, ref: str) -> Secret:
        obj = super().__new__(cls, value)
        obj.ref = ref
        return obj

    def __repr__(self) -> str:  # a stray %r in a log line must not leak it
        return f"Secret({self.ref!r})"

    def __reduce__(self) -> tuple:
        return (Secret, (str(self), self.ref))


def is_secret_key(name: str) -> bool:
    """Whether a settings key holds a secret (``sasl.password`` yes, ``ssl.key.location`` no)."""
    low = name.lower()
    if low in _SECRET_KEYS:
        return True
    words = [w for w in re.split(r"[._\-]", low) if w]
    if not words or words[-1] in _NOT_SECRET_LAST:
        return False
    return any(w in _SECRET_WORDS or w.endswith(("password", "secret", "token")) for w in words)


def redacted(value: Any, key: str = "") -> Any:
    """How a config value may be shown: a :class:`Secret` as its reference, a secret key's value as ``***``."""
    if isinstance(value, Secret):
        return value.ref
    if key and is_secret_key(key) and value not in (None, ""):
        return REDACTED
    return value


def resolve_secrets(
    raw: Any, base_dir: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None
) -> tuple[Any, list[str]]:
    """``raw`` with every ``${env:...}``/``${file:...}`` in its strings resolved, and the problems found.

    Relative ``${file:...}`` paths are taken from ``base_dir`` (the config file's directory).
    Problems read ``kafka.settings.sasl.password: environment variable KAFKA_PASSWORD is not set``.
    """
    env = os.environ if environ is None else environ
    problems: list[str] = []

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, dict):
            return {k: walk(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, f"{path}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, str) and "${" in value:
            return _resolve_one(value, path or "(top level)", env, base_dir, problems)
        return value

    return walk(raw, ""), problems


def _resolve_one(template: str, path: str, env: Mapping[str, str], base_dir: Any, problems: list[str]) -> Any:
    failed = False

    def lookup(m: re.Match) -> str:
        nonlocal failed
        kind, arg = m[1], m[2].strip()
        if kind == "env":
            if arg in env:
                return env[arg]
            problems.append(f"{path}: environment variable {arg} is not set (referenced as {m[0]})")
        elif kind == "file":
            p = Path(arg).expanduser()
            if not p.is_absolute() and base_dir is not None:
                p = Path(base_dir) / p
            try:
                text = p.read_text()
            except OSError as exc:
                problems.append(f"{path}: cannot read secret file {p} ({exc.strerror or exc})")
            else:
                return _chomp(text)
        else:
            problems.append(f"{path}: unknown reference {m[0]}; use ${{env:NAME}} or ${{file:/path}}")
        failed = True
        return ""

    value = _REF.sub(lookup, template)
    if failed or not _REF.search(template):  # failed (reported), or "${" without a reference: a literal
        return template
    return Secret(value, template)


def _chomp(text: str) -> str:
    """A secret file's content without the one line ending ``echo pw > file`` adds."""
    return text.removesuffix("\n").removesuffix("\r")
