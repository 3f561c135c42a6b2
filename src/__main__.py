"""``python -m dora_fused audit ...``: see dora_fused.cli."""

import sys

from .cli import main

sys.exit(main())
