"""Fake cluster commands (scontrol, sbatch) placed first on PATH by tests."""

from __future__ import annotations

import stat
from pathlib import Path


def make_stub_command(tmp_path: Path, name: str, *, reply: str = "") -> tuple[Path, Path]:
    """Write ``tmp_path/bin/<name>``, a script that appends its arguments to ``tmp_path/<name>.log`` and
    prints ``reply``; returns ``(bin_dir, log)``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / f"{name}.log"
    script = bin_dir / name
    echo = f'echo "{reply}"\n' if reply else ""
    script.write_text(f'#!/bin/sh\necho "$@" >> "{log}"\n{echo}')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return bin_dir, log
