"""``python -m tileattn.cli`` (the Makefile's ``make demo``) = ``tileattn``."""

import sys

from . import main

sys.exit(main())
