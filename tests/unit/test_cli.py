"""The command line's one error path and its output switches."""

from __future__ import annotations

import logging
import os

import pytest

from dlightning.cli import VERBS, build_parser, main
from dlightning.errors import ConfigError


@pytest.fixture(autouse=True)
def _restore_level():
    level = logging.getLogger("dlightning").level
    env = os.environ.get("DLIGHTNING_LOG_LEVEL")
    yield
    logging.getLogger("dlightning").setLevel(level)
    if env is None:
        os.environ.pop("DLIGHTNING_LOG_LEVEL", None)
    else:
        os.environ["DLIGHTNING_LOG_LEVEL"] = env


def test_every_verb_is_in_the_one_table() -> None:
    names = [verb.name for verb in VERBS]
    assert names == sorted(set(names), key=names.index)  # no duplicates
    assert set(names) == {"fit", "validate", "export", "upscale", "evaluate", "shards", "submit", "config",
                          "inspect", "demo"}


def test_bad_input_is_one_line_exit_2_and_debug_shows_the_traceback(caplog: pytest.LogCaptureFixture) -> None:
    assert main(["fit", "--config", "no/such.yaml"]) == 2
    assert "config file no/such.yaml does not exist" in caplog.text
    with pytest.raises(ConfigError):
        main(["fit", "--debug", "--config", "no/such.yaml"])
    with pytest.raises(ConfigError):
        main(["--debug", "fit", "--config", "no/such.yaml"])


@pytest.mark.parametrize(("flags", "level"), [(["--quiet"], "WARNING"), (["-v"], "DEBUG")])
def test_quiet_and_verbose_set_the_level_for_every_rank(flags: list[str], level: str) -> None:
    main(["config", *flags, "--config", "no/such.yaml"])
    assert logging.getLevelName(logging.getLogger("dlightning").level) == level
    assert os.environ["DLIGHTNING_LOG_LEVEL"] == level  # inherited by the ranks Lightning starts


def test_quiet_and_verbose_exclude_each_other() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["config", "--quiet", "--verbose"])
