"""Paths of the checkout that tests read (the same from every test folder)."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"
HELPERS = TESTS / "helpers"
GOLDEN = TESTS / "golden"
CONFIGS = REPO / "dlightning" / "configs"
BENCHMARKS = REPO / "benchmarks"
