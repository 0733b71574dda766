"""``python -m data_prep build|verify|demo ...``: the same as ``dlightning shards build|verify|demo ...``."""

import sys

from dlightning.cli import main

sys.exit(main(["shards", *sys.argv[1:]], prog="python -m data_prep"))
