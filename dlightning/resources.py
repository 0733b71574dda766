"""Files shipped inside the package (configs, templates): found the same way in a checkout and an install."""

from __future__ import annotations

from pathlib import Path

from dlightning.errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent
CONFIG_DIR = PACKAGE_DIR / "configs"
"""The shipped configs (the checkout's top-level ``configs/`` links here)."""


def shipped_config(name: str) -> Path:
    """The path of a shipped config, e.g. ``shipped_config("demo.yaml")``.

    Raises:
        ConfigError: No such shipped config (the message lists the ones there are).
    """
    path = CONFIG_DIR / name
    if not path.is_file():
        known = sorted(str(p.relative_to(CONFIG_DIR)) for p in CONFIG_DIR.rglob("*.yaml"))
        raise ConfigError(f"no shipped config {name!r}; shipped: {known}")
    return path
