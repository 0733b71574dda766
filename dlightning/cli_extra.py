"""Registration point for subcommands implemented in their own modules (export, upscale, validate)."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def register(sub: argparse._SubParsersAction, add_config_args: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add the optional subcommands to ``sub``; each module owns its arguments."""
    return None
