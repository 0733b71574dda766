"""Checks that need a CUDA GPU (marked ``gpu``: skipped by the default suite; run ``pytest -m gpu``).

* the tiny config through consistency -> detail -> consistency under DeepSpeed ZeRO-2 and under DDP
  on one GPU, bf16-mixed: the losses must match closely (CUDA's atomics-based backward kernels, e.g.
  grid_sample's, are not deterministic, so not bit for bit; the CPU twin of this check, with two
  processes and bit-for-bit equality, is ``tests/integration/test_deepspeed.py``), and the groups a phase holds
  still must not move;
* the full-size (SD 2.1 architecture, random weights) training step and inference benchmarks run
  one short pass each on CUDA without writing results.
"""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import train_probe
from helpers.paths import REPO

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

STEPS = 6
COMMON = ["trainer.accelerator=gpu", "trainer.devices=1", "optim.accumulate=1",
          "optim.mask_mode=zero_lr", "trainer.precision=bf16-mixed", "trainer.checkpoint_every=3",
          "optim.clip_norm={c_lora: 0, cfr: 0, d_lora: 0, conv_in: 0}"]


def _train(root: Path, strategy: str) -> list[dict[str, str]]:
    overrides = train_probe.tiny_overrides(root / "run", STEPS, c_end=1, d_end=3,
                                           extra=[*COMMON, f"trainer.strategy={strategy}"])
    train_probe.run_probe(root / "dump", overrides)
    (path,) = (root / "run" / "logs").rglob("metrics.csv")
    return list(csv.DictReader(path.open()))


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")
def test_deepspeed_zero2_matches_ddp_on_cuda(tmp_path: Path) -> None:
    ours, theirs = _train(tmp_path / "deepspeed", "deepspeed_stage_2"), _train(tmp_path / "ddp", "ddp")
    assert [r["train/phase"] for r in ours] == ["0.0", "0.0", "1.0", "1.0", "0.0", "0.0"]
    assert float(ours[0]["train/loss"]) == pytest.approx(float(theirs[0]["train/loss"]), rel=1e-4)
    for a, b in zip(ours, theirs, strict=True):
        assert float(a["train/loss"]) == pytest.approx(float(b["train/loss"]), rel=5e-3), a["step"]
    ds = train_probe.load_dumps(tmp_path / "deepspeed" / "dump", range(1), range(STEPS + 1))
    groups = ds[0, 0]["groups"]
    for start, end, frozen in ((0, 2, "d_lora"), (2, 4, "c_lora"), (4, 6, "d_lora")):
        before, after = ds[0, start]["params"], ds[0, end]["params"]
        assert all(torch.equal(before[k], after[k]) for k, g in groups.items() if g == frozen), (frozen, start)


@pytest.mark.parametrize("script,args", [
    ("bench_train_step.py", ["--precisions", "bf16", "--phases", "consistency", "detail", "--checkpointing", "on",
                             "--warmup", "1", "--steps", "1"]),
    ("bench_inference.py", ["--frames", "8", "--compile", "off", "--merged", "yes"]),
])
def test_full_size_benchmarks_run_on_cuda(script: str, args: list[str]) -> None:
    cmd = [sys.executable, str(REPO / "benchmarks" / script), "--device", "cuda", "--full", "--no-append", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
