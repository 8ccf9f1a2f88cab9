"""`python -m voice ...` runs the `voice` command (see `voice.cli`)."""
from __future__ import annotations

import sys

from .cli import main

sys.exit(main())
