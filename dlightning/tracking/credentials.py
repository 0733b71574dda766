"""Where W&B would find an API key, without starting W&B or contacting a server.

``logging.wandb_mode=auto`` goes online only when W&B has credentials, so this looks where wandb
itself looks, in its order: the ``WANDB_API_KEY`` (or ``WANDB_IDENTITY_TOKEN_FILE``) environment
variable, the netrc file (``$NETRC``, else ``~/.netrc``, else ``~/_netrc``) entry for the W&B host,
then the ``api_key`` of a W&B settings file (``$WANDB_CONFIG_DIR/settings`` or
``~/.config/wandb/settings``, and ``<wandb dir>/wandb/settings``).

Written with Python's ``netrc`` and ``configparser`` rather than calling wandb: wandb 0.31 keeps its
reader in the private ``wandb.sdk.lib.wbauth`` package (it moved there from ``wandb.sdk.lib.apikey``,
whose ``api_key`` function no longer exists), and importing wandb costs seconds. Only the source is
reported, never the key.
"""

from __future__ import annotations

import configparser
import netrc
import os
from pathlib import Path
from urllib.parse import urlsplit

from dlightning.utils.logging import get_logger

log = get_logger(__name__)

DEFAULT_HOST = "https://api.wandb.ai"


def wandb_host() -> str:
    """The W&B server W&B would talk to: ``WANDB_BASE_URL``, a settings file's ``base_url``, or api.wandb.ai."""
    return os.environ.get("WANDB_BASE_URL") or _settings_value("base_url") or DEFAULT_HOST


def find_wandb_credentials() -> str | None:
    """Name the first source of W&B credentials (an environment variable or a file), or None when there is none."""
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        if os.environ.get(var):
            return f"the {var} environment variable"
    host = urlsplit(wandb_host()).netloc
    path = _netrc_path()
    if host and path.is_file():
        try:
            entry = netrc.netrc(str(path)).authenticators(host)
        except (netrc.NetrcParseError, OSError) as err:
            # wandb warns and goes on without the file too
            log.warning("cannot read %s (%s); W&B credentials from it are ignored", path, err)
            entry = None
        if entry and entry[2]:
            return f"{path} (machine {host})"
    for settings in _settings_files():
        if _read_settings(settings).get("api_key"):
            return f"the W&B settings file {settings}"
    return None


def _netrc_path() -> Path:
    """The netrc file wandb reads: ``$NETRC``, else ``~/.netrc``, else ``~/_netrc`` (Windows' name)."""
    if os.environ.get("NETRC"):
        return Path(os.environ["NETRC"]).expanduser()
    unix = Path("~/.netrc").expanduser()
    windows = Path("~/_netrc").expanduser()
    return windows if not unix.exists() and windows.exists() else unix


def _settings_files() -> list[Path]:
    """The workspace settings file first (it wins in wandb), then the global one."""
    config_dir = Path(os.environ.get("WANDB_CONFIG_DIR") or Path("~/.config/wandb").expanduser())
    workspace = Path(os.environ.get("WANDB_DIR") or ".") / "wandb" / "settings"
    return [workspace, config_dir / "settings"]


def _read_settings(path: Path) -> dict[str, str]:
    """The ``[default]`` section of a W&B settings file (INI), empty when missing or unreadable."""
    parser = configparser.ConfigParser()
    try:
        parser.read(path, encoding="utf-8")
    except (configparser.Error, OSError, UnicodeDecodeError) as err:
        log.warning("cannot read the W&B settings file %s (%s); it is ignored", path, err)
        return {}
    return dict(parser["default"]) if parser.has_section("default") else {}


def _settings_value(key: str) -> str | None:
    for path in _settings_files():
        value = _read_settings(path).get(key)
        if value:
            return value
    return None
