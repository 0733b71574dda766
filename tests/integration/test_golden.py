"""Golden files that make a behaviour change visible in review.

- ``tests/golden/configs/*.yaml``: the resolved config of every shipped YAML (training configs through
  ``dlightning config``, shard-building configs through their loader). A renamed key, a changed
  default or a changed derived setting shows up as a diff of these files.
- ``tests/golden/losses_tiny_cpu.json``: the per-step loss terms of a 10-step tiny CPU run through
  consistency -> detail -> consistency (synthetic clips, accumulation 2, fp32).

Regenerate after an intended change with
``DLIGHTNING_UPDATE_GOLDEN=1 .venv/bin/pytest tests/integration/test_golden.py`` and review the diff.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import pytest
from helpers import train_probe

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "dlightning" / "configs"
GOLDEN = REPO / "tests" / "golden"
UPDATE = os.environ.get("DLIGHTNING_UPDATE_GOLDEN") == "1"
TRAINING_CONFIGS = sorted(p for p in CONFIGS.glob("*.yaml")) + sorted(CONFIGS.glob("launch/*.yaml"))
SHARD_CONFIGS = sorted(CONFIGS.glob("data_prep/*.yaml"))
SHARD_REQUIRED = ["output_dir=/data/shards", "sources.0.root=/data/in"]
"""Values the shard-building configs leave for the command line (the demo config needs neither)."""
LOSS_KEYS = ("train/loss", "train/loss_l2", "train/loss_lpips", "train/loss_csd", "train/loss_temporal")


def _check_golden(path: Path, text: str) -> None:
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert path.is_file(), f"{path} is missing; create it with DLIGHTNING_UPDATE_GOLDEN=1"
    assert path.read_text(encoding="utf-8") == text, (
        f"{path.relative_to(REPO)} differs from the resolved config; if the change is intended, regenerate "
        "it with DLIGHTNING_UPDATE_GOLDEN=1 and review the diff")


@pytest.mark.parametrize("path", TRAINING_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_resolved_training_config_matches_golden(path: Path) -> None:
    from dlightning.config import load_config, to_yaml

    name = str(path.relative_to(CONFIGS)).replace("/", "__")
    _check_golden(GOLDEN / "configs" / name, to_yaml(load_config([path])))


@pytest.mark.parametrize("path", SHARD_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_resolved_shard_config_matches_golden(path: Path) -> None:
    from dlightning.contracts.config_io import to_yaml
    from dlightning.shards.config import load_prep_config

    overrides = [] if path.stem == "demo" else SHARD_REQUIRED
    name = "data_prep__" + path.name
    _check_golden(GOLDEN / "configs" / name, to_yaml(load_prep_config(str(path), overrides)))


def _logged_losses(run_dir: Path) -> dict[str, dict[str, float]]:
    """``{optimizer step: {loss key: value}}`` from the CSV logger of a run."""
    rows = list(csv.DictReader((run_dir / "logs" / "csv" / "version_0" / "metrics.csv").open()))
    losses: dict[str, dict[str, float]] = {}
    for row in rows:
        values = {k: float(row[k]) for k in LOSS_KEYS if row.get(k)}
        if values:
            losses.setdefault(row["step"], {}).update(values)
    return losses


def test_tiny_cpu_losses_match_golden(tmp_path: Path) -> None:
    import torch

    from dlightning.config import load_config
    from dlightning.train import fit

    torch.set_num_threads(1)  # one thread: reductions run in one fixed order
    overrides = train_probe.tiny_overrides(tmp_path / "run", 10, c_end=3, d_end=6)
    fit(load_config([train_probe.DEMO_CONFIG], overrides), fresh=True)
    losses = _logged_losses(tmp_path / "run")
    assert sorted(losses, key=int) == [str(s) for s in range(1, 11)]
    path = GOLDEN / "losses_tiny_cpu.json"
    if UPDATE:
        path.write_text(json.dumps(losses, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    golden = json.loads(path.read_text(encoding="utf-8"))
    assert golden.keys() == losses.keys()
    for step, values in golden.items():
        for key, expected in values.items():
            # CPU kernels are deterministic on one thread; the tolerance only absorbs a changed BLAS build.
            assert math.isclose(losses[step][key], expected, rel_tol=1e-5, abs_tol=1e-7), (
                f"step {step} {key}: {losses[step][key]!r} != golden {expected!r}; regenerate with "
                "DLIGHTNING_UPDATE_GOLDEN=1 if the change is intended")
