"""``python -m foof``: the same as the ``foof`` command."""

import sys

from foof.cli import main

sys.exit(main())
