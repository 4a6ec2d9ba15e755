"""The decoders, by format; the names the rest of the daemon imports."""

from __future__ import annotations

from streamtrain.streams.decode.common import REASONS, Decoded, Decoder, LabelRule, Reject, make_decoder, value_bytes

__all__ = ["REASONS", "Decoded", "Decoder", "LabelRule", "Reject", "make_decoder", "value_bytes"]
