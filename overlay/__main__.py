"""``python -m overlay``: the backingfs-overlay command."""

import sys

from .cli import main

sys.exit(main())
