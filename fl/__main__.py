"""Entry point of ``python -m fed_plora.fl`` (the same as the ``fed-plora`` command)."""

import sys

from .cli import main

sys.exit(main())
