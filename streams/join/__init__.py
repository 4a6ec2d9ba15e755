"""Labels that come later: feature records joined with label records by a key (``data.labels``).

:class:`~streamtrain.streams.join.joiner.Joiner` holds the records that wait (features for
their label, labels for their features) and decides, per partition pair, what is trained
and when; :mod:`~streamtrain.streams.join.done` keeps which offsets past a partition's
position are done, the part of the exactly-once state a join adds (docs/ARCHITECTURE.md,
"Labels that come later").
"""

from streamtrain.streams.join.done import decode, encode
from streamtrain.streams.join.joiner import Joined, Joiner, JoinStats

__all__ = ["JoinStats", "Joined", "Joiner", "decode", "encode"]
