"""A non-editable install runs every verb: configs and templates are package data, nothing reads the checkout.

The wheel is built from this checkout and installed with ``--no-deps --target`` next to the test
environment's dependencies; the commands run from a folder outside the source tree.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VERBS = ("fit", "validate", "export", "upscale", "shards", "submit", "config", "inspect", "demo")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """(a folder outside the checkout, the environment that imports the installed wheel)."""
    root = tmp_path_factory.mktemp("install")
    source, wheels, target, work = root / "source", root / "wheels", root / "site", root / "work"
    work.mkdir()
    # Build from a copy: setuptools writes build/ and *.egg-info/ into the tree it builds.
    shutil.copytree(REPO, source, symlinks=True,
                    ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__", "demo_run"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source)],
                   check=True, timeout=300, cwd=root)
    wheel = next(wheels.glob("dlightning-*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(target)}
    return work, env


def _run(args: list[str], installed: tuple[Path, dict[str, str]], timeout: float = 120) -> str:
    work, env = installed
    proc = subprocess.run([sys.executable, "-P", *args], cwd=work, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_installed_package_is_the_one_imported(installed) -> None:
    out = _run(["-c", "import dlightning, data_prep; print(dlightning.__file__); print(data_prep.__file__)"],
               installed)
    assert all(str(REPO) not in line for line in out.splitlines()), out


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_help(installed, verb: str) -> None:
    assert verb in _run(["-m", "dlightning", verb, "--help"], installed)


def test_shipped_configs_and_templates_are_installed(installed, tmp_path: Path) -> None:
    """The shipped demo config resolves and ``submit --dry-run`` renders the sbatch template, both from
    the installed package."""
    code = ("from dlightning.resources import shipped_config; from dlightning.config import load_config; "
            "print(load_config([shipped_config('demo.yaml')]).model.preset)")
    assert _run(["-c", code], installed).strip() == "tiny"
    run_dir = tmp_path / "run"
    code = ("import sys; from dlightning.cli import main; from dlightning.resources import shipped_config; "
            f"sys.exit(main(['submit', '--dry-run', '-c', str(shipped_config('demo.yaml')), "
            f"'-c', str(shipped_config('launch/2x8.yaml')), 'trainer.run_dir={run_dir}', "
            "'data.backend=synthetic', 'validation.every_n_steps=0']))")  # no shard sets to check here
    _run(["-c", code], installed)
    assert "#SBATCH --nodes=2" in (run_dir / "train.sbatch").read_text()


@pytest.mark.slow
def test_installed_demo_runs(installed, tmp_path: Path) -> None:
    """``dlightning demo`` end to end from the installed wheel (several minutes on 2 cores)."""
    _run(["-m", "dlightning", "demo", "--out", str(tmp_path / "demo")], installed, timeout=1800)
    assert (tmp_path / "demo" / "upscaled.mp4").is_file()
