"""``logging.wandb_mode=auto``: online exactly when W&B itself would find credentials, and the environment's
WANDB_MODE wins. Only the mode is resolved here: no W&B run starts and no server is contacted.

Each case is checked against wandb's own netrc reader (private in wandb 0.31, so it serves as the
independent oracle here rather than as the implementation).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from dlightning.errors import ConfigError
from dlightning.tracking.credentials import find_wandb_credentials
from dlightning.tracking.wandb_run import resolve_wandb_mode, wandb_mode_decision

KEY = "0123456789abcdef" * 2 + "01234567"  # 40 characters, the shape of a W&B API key


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty HOME, no W&B variables, W&B's config dir and workspace inside the tmp folder."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.chdir(tmp_path)
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_DIR", "NETRC"):
        monkeypatch.delenv(var, raising=False)
    return home


def _wandb_reads_a_key(host: str = "https://api.wandb.ai") -> bool:
    from wandb.sdk.lib.wbauth import read_netrc_auth

    return read_netrc_auth(host=host) is not None


def _netrc(path: Path, machine: str) -> None:
    path.write_text(f"machine {machine}\n  login user\n  password {KEY}\n", encoding="utf-8")
    path.chmod(0o600)


def test_no_credentials_anywhere_is_offline(home: Path) -> None:
    assert find_wandb_credentials() is None and not _wandb_reads_a_key()
    mode, reason = wandb_mode_decision("auto")
    assert mode == "offline" and "no W&B credentials" in reason


def test_a_netrc_entry_for_the_wandb_host_is_online_and_names_the_file_not_the_key(home: Path) -> None:
    _netrc(home / ".netrc", "api.wandb.ai")
    assert _wandb_reads_a_key()  # wandb itself would log in with it
    mode, reason = wandb_mode_decision("auto")
    assert mode == "online"
    assert str(home / ".netrc") in reason and "api.wandb.ai" in reason and KEY not in reason
    assert resolve_wandb_mode("offline") == "offline" and resolve_wandb_mode("disabled") == "disabled"


def test_a_netrc_entry_for_another_host_is_not_enough(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _netrc(home / ".netrc", "wandb.example.org")
    assert resolve_wandb_mode("auto") == "offline" and not _wandb_reads_a_key()
    # the configured server is the one that counts: WANDB_BASE_URL picks it
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert _wandb_reads_a_key("https://wandb.example.org")
    assert resolve_wandb_mode("auto") == "online"


def test_the_netrc_variable_names_the_file(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = tmp_path / "secrets" / "netrc"
    elsewhere.parent.mkdir()
    _netrc(elsewhere, "api.wandb.ai")
    assert resolve_wandb_mode("auto") == "offline"
    monkeypatch.setenv("NETRC", str(elsewhere))
    assert _wandb_reads_a_key()
    assert wandb_mode_decision("auto") == ("online", f"logging.wandb_mode=auto and W&B credentials in {elsewhere} "
                                                     "(machine api.wandb.ai)")


def test_the_api_key_variable_and_a_settings_file_count(home: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    settings = tmp_path / "wandb-config" / "settings"
    settings.parent.mkdir()
    settings.write_text(f"[default]\napi_key = {KEY}\n", encoding="utf-8")
    assert find_wandb_credentials() == f"the W&B settings file {settings}"
    settings.unlink()
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    assert find_wandb_credentials() == "the WANDB_API_KEY environment variable"


def test_an_unreadable_netrc_warns_and_counts_as_none(home: Path, caplog: pytest.LogCaptureFixture,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from dlightning.tracking import credentials

    (home / ".netrc").write_text(f"macine api.wandb.ai password {KEY}\n", encoding="utf-8")  # a typo
    monkeypatch.setattr(credentials.log, "propagate", True)  # let caplog see the rank-zero logger's records
    with caplog.at_level(logging.WARNING):
        assert resolve_wandb_mode("auto") == "offline"
    assert "cannot read" in caplog.text


def test_wandb_mode_from_the_environment_wins(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _netrc(home / ".netrc", "api.wandb.ai")
    monkeypatch.setenv("WANDB_MODE", "offline")
    mode, reason = wandb_mode_decision("online")
    assert mode == "offline" and reason.startswith("WANDB_MODE=offline")
    monkeypatch.setenv("WANDB_MODE", "dryrun")  # wandb's old name for offline
    assert resolve_wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ConfigError, match="WANDB_MODE='sometimes' is not a W&B mode"):
        resolve_wandb_mode("auto")
