"""The one exception tree of streamtrain.

Every error the project raises on purpose derives from :class:`StreamtrainError`.
Messages say what went wrong and what to do next; Kafka errors are chained with
``raise ... from exc`` so the librdkafka error code stays visible.
"""

from __future__ import annotations


class StreamtrainError(Exception):
    """Root of every error streamtrain raises on purpose."""


class ConfigError(StreamtrainError):
    """The configuration is invalid; lists every problem with its key path."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"invalid configuration ({len(self.problems)} problem(s)):\n{lines}")


class KafkaSourceError(StreamtrainError):
    """The Kafka consumer could not be set up or failed for good."""


class DeadLetterError(StreamtrainError):
    """A rejected record could not be written to the dead-letter topic."""


class DecodeError(StreamtrainError):
    """A record could not be turned into features and a label (carries a reason)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


class DecoderCrashError(StreamtrainError):
    """A record crashed the decoder and ``data.on_decoder_crash`` is ``stop`` (streams/quarantine.py)."""
