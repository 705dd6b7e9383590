"""``python -m fastmerge ...`` is the ``fastmerge`` command."""

import sys

from .cli import main

sys.exit(main())
