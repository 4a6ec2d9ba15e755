"""``python -m daemon`` is ``streamtrain``."""

import sys

from daemon.cli import main

sys.exit(main())
