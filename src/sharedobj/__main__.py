"""Entry point of ``python -m sharedobj``."""

import sys

from .cli import main

sys.exit(main())
