"""``python -m streamtrain`` is the ``streamtrain`` command."""

import sys

from streamtrain.cli import main

sys.exit(main())
