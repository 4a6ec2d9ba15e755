"""streamtrain: a daemon that trains PyTorch models online from Kafka topics.

The installed package is laid out by the repository's folders (``pyproject.toml`` maps
them): ``streamtrain.daemon`` the running service, ``streamtrain.streams`` the data path
(usable alone as a PyTorch ``IterableDataset``), ``streamtrain.models`` the models,
``streamtrain.config`` config loading, ``streamtrain.tools`` the offline commands.
docs/ARCHITECTURE.md draws how they fit.
"""

from __future__ import annotations

import os

# Run from a checkout without installing it (a second worktree, ``PYTHONPATH=checkout``):
# the subpackages are the folders beside this one.  An installed package has them inside.
_checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isfile(os.path.join(_checkout, "pyproject.toml")) and os.path.isdir(os.path.join(_checkout, "daemon")):
    __path__.append(_checkout)
