"""``python -m tileattn`` = the ``tileattn`` command."""

import sys

from .cli import main

sys.exit(main())
