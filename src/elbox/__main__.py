"""``python -m elbox`` is the ``elbox`` command."""

import sys

from elbox.cli import main

sys.exit(main())
