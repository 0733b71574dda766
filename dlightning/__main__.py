"""``python -m dlightning`` runs the command line."""

import sys

from dlightning.cli import main

sys.exit(main())
