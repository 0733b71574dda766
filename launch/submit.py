"""Submit a training run to SLURM.

    python launch/submit.py --config configs/sd21.yaml --config configs/launch/2x8.yaml \
        trainer.run_dir=runs/sd21-2x8 launch.partition=gpu [--dry-run]

Writes the resolved config, the code version and the rendered ``train.sbatch`` into
``trainer.run_dir``, then calls ``sbatch`` (``--dry-run`` stops before that). The logic lives in
``dlightning.launch``.
"""

from __future__ import annotations

import argparse
import sys

from dlightning.errors import ConfigError
from dlightning.launch import submit_from_config
from dlightning.utils.logging import get_logger

log = get_logger("dlightning.launch.submit")


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and submit; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", "-c", action="append", default=[], help="YAML config file (repeatable)")
    parser.add_argument(
        "--dry-run", action="store_true", help="write the run folder and script, do not submit"
    )
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. launch.partition=gpu")
    args = parser.parse_args(argv)
    try:
        script = submit_from_config(args.config, args.overrides, dry_run=args.dry_run)
    except ConfigError as err:
        log.error("%s", err)
        return 2
    sys.stdout.write(f"{script}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
