#!/usr/bin/env python3
"""Submit a training run to SLURM: the same as ``dlightning submit``.

    python launch/submit.py --config configs/sd21.yaml --config configs/launch/2x8.yaml \
        trainer.run_dir=runs/sd21-2x8 launch.partition=gpu [--dry-run]
"""

from __future__ import annotations

import sys

from dlightning.cli import main

if __name__ == "__main__":
    sys.exit(main(["submit", *sys.argv[1:]], prog="launch/submit.py"))
