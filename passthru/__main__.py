"""``python -m passthru``: the backingfs-passthru command."""

import sys

from .cli import main

sys.exit(main())
