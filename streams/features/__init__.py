"""What a record's fields become: numbers (missing ones marked), category rows, labels (booleans, class names).

One room for the data path and serving alike: the decoders and ``streamtrain serve`` turn
values into model inputs through here, so the hash, the missing marks and the class
lookup are one implementation.  :mod:`.hashing` is the hash (documented bit for bit);
:class:`FeatureSpec` is the config's view of the fields.
"""

from __future__ import annotations

from streamtrain.streams.features.spec import MISSING_NUMBER, FeatureSpec, is_missing

__all__ = ["MISSING_NUMBER", "FeatureSpec", "is_missing"]
