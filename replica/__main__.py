"""``python -m replica generate "prompt"`` (or ``demo``): offline use, no server."""

import sys

from replica.cli import main

sys.exit(main())
