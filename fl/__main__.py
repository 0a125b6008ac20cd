"""Entry point of ``python -m fl``."""

import sys

from .cli import main

sys.exit(main())
