"""The ``dlightning`` command line: one entry point with subcommands.

Every subcommand that reads a config takes ``--config FILE`` (repeatable; later files win) and
trailing ``key=value`` overrides, e.g. ``dlightning fit --config configs/demo.yaml optim.lr=1e-4``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from dlightning.errors import ConfigError, MissingWeightsError
from dlightning.utils.logging import get_logger

log = get_logger(__name__)


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", action="append", default=[], help="YAML config file (repeatable)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-4")


def _load(args: argparse.Namespace):
    from dlightning.config import load_config

    return load_config(args.config, args.overrides)


def cmd_config(args: argparse.Namespace) -> int:
    """Print the resolved configuration."""
    from dlightning.config import to_yaml

    sys.stdout.write(to_yaml(_load(args)))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """Print LoRA target counts and trainable parameters per group, built on the meta device."""
    from dlightning.models.inspect import format_inspection, inspect_model

    cfg = _load(args)
    sys.stdout.write(format_inspection(inspect_model(cfg.model)) + "\n")
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    """Train (or resume the newest valid checkpoint in trainer.run_dir)."""
    from dlightning.training.run import fit

    fit(_load(args), fresh=args.fresh)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Build the demo shards, train the tiny demo model, export it and upscale a sample video."""
    from dlightning.demo import run_demo

    run_demo(args.out, overrides=args.overrides)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(prog="dlightning", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    commands: list[tuple[str, Callable, str]] = [
        ("config", cmd_config, "print the resolved config"),
        ("inspect", cmd_inspect, "LoRA targets and trainable parameter counts (meta device)"),
        ("fit", cmd_fit, "train; resumes from the newest valid checkpoint in trainer.run_dir"),
    ]
    for name, fn, help_text in commands:
        p = sub.add_parser(name, help=help_text)
        _add_config_args(p)
        p.set_defaults(func=fn)
        if name == "fit":
            p.add_argument("--fresh", action="store_true", help="ignore existing checkpoints in run_dir")
    demo = sub.add_parser("demo", help="tiny end-to-end demo on generated shards (CPU, minutes)")
    demo.add_argument("--out", default="demo_run", help="folder for shards, run, export and video")
    demo.add_argument("overrides", nargs="*", help="key=value overrides for the demo training config")
    demo.set_defaults(func=cmd_demo)
    _register_optional(sub)
    return parser


def _register_optional(sub: argparse._SubParsersAction) -> None:
    """Subcommands that live in their own modules (export, upscale, validate)."""
    from dlightning import cli_extra

    cli_extra.register(sub, _add_config_args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dlightning`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, MissingWeightsError) as err:
        log.error("%s", err)
        return 2


if __name__ == "__main__":
    sys.exit(main())
