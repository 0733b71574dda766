"""Tiny dlightning trainings for the training, resume and DDP tests (imported, or run as a script).

``tiny_overrides`` gives the config overrides of a CPU run on the tiny model with synthetic 32x32 clips.
``StepDump`` writes, on every rank, the trainable tensors and the micro-batch keys at every optimizer-step
boundary to ``rank{r}_step{n}.pt`` (step 0 = the initial weights, written when training starts).

As a script (Lightning's DDP launcher re-executes it once per extra rank with the same arguments)::

    python tests/helpers/train_probe.py --dump DIR [--resume] key=value ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = str(REPO / "configs" / "demo.yaml")


def segments_override(segments: list[tuple[str, int | None, dict[str, float]]]) -> str:
    """``schedule.segments=[...]`` from ``(phase, end, weights)`` tuples (no ramps)."""
    items = []
    for phase, end, weights in segments:
        w = ", ".join(f"{k}: {v}" for k, v in weights.items())
        items.append(f"{{phase: {phase}, end: {'null' if end is None else end}, weights: {{{w}}}}}")
    return "schedule.segments=[" + ", ".join(items) + "]"


CONSISTENCY_W = {"l2": 1.0, "lpips": 0.2, "csd": 0.0, "temporal": 1.0}
DETAIL_W = {"l2": 1.0, "lpips": 0.2, "csd": 0.1, "temporal": 1.0}


def cdc_segments(c_end: int, d_end: int) -> str:
    """Consistency [0, c_end], detail (c_end, d_end], consistency afterwards."""
    return segments_override([("consistency", c_end, CONSISTENCY_W), ("detail", d_end, DETAIL_W),
                              ("consistency", None, CONSISTENCY_W)])


def tiny_overrides(run_dir: str | Path, max_steps: int, *, c_end: int, d_end: int,
                   extra: list[str] | None = None) -> list[str]:
    """Overrides of ``configs/demo.yaml`` for a few-step CPU run on synthetic 32x32 clips (accumulate 2)."""
    return [
        "data.backend=synthetic", "data.num_workers=0", "data.crop_size=32", "data.batch_size=1",
        f"trainer.run_dir={run_dir}", f"trainer.max_steps={max_steps}", "trainer.log_every=1",
        "trainer.accelerator=cpu", "optim.accumulate=2", "logging.backend=csv", "validation.every_n_steps=0",
        cdc_segments(c_end, d_end), *(extra or []),
    ]


def parameter_group_names(pl_module: LightningModule) -> dict[str, str]:
    """Map each trainable parameter name to its optimizer group (c_lora, cfr, d_lora, conv_in)."""
    group_of = {id(p): name for name, ps in pl_module.generator.parameter_groups().items() for p in ps}
    return {k: group_of[id(v)] for k, v in pl_module.named_parameters() if id(v) in group_of}


class StepDump(Callback):
    """Saves ``{"params", "keys", "optimizer_step", "micro_step", "groups", "sync_bytes"}`` per rank per
    optimizer step.

    ``keys`` are the synthetic clip keys of the micro-batches of that step (they name rank and micro-batch).
    ``sync_bytes`` counts the bytes the phase-aware DDP hook all-reduced so far (None without one).
    """

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir)
        self._keys: list[str] = []

    def _save(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        state = {"params": pl_module.trainable_state_dict(), "keys": list(self._keys),
                 "optimizer_step": int(pl_module.optimizer_step), "micro_step": int(pl_module.micro_step),
                 "groups": parameter_group_names(pl_module),
                 "sync_bytes": getattr(pl_module.grad_sync, "bytes_reduced", None)}
        torch.save(state, self.out_dir / f"rank{trainer.global_rank}_step{pl_module.optimizer_step}.pt")
        self._keys = []

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._save(trainer, pl_module)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._keys.extend(str(k) for k in batch["key"])
        if pl_module.at_step_boundary:
            self._save(trainer, pl_module)


def run_probe(dump: Path, overrides: list[str], *, resume: bool = False, timeout_s: float = 420,
              env: dict[str, str] | None = None) -> None:
    """Run this script in a subprocess (Lightning starts the other ranks) and assert it succeeded."""
    import os
    import subprocess

    # The interpreter's bin folder first: DeepSpeed's CPU path builds an op with the venv's ninja.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": path, **(env or {})}
    cmd = [sys.executable, __file__, "--dump", str(dump), *(["--resume"] if resume else []), *overrides]
    proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout_s)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def load_dumps(dump: Path, ranks: range, steps: range) -> dict[tuple[int, int], dict]:
    """``{(rank, step): dump}`` for the given ranks and optimizer steps."""
    return {(r, s): torch.load(dump / f"rank{r}_step{s}.pt", weights_only=True) for r in ranks for s in steps}


def main(argv: list[str] | None = None) -> int:
    """Run ``fit`` on ``configs/demo.yaml`` + overrides with a :class:`StepDump` callback."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dump", required=True, help="folder for rank{r}_step{n}.pt")
    parser.add_argument("--resume", action="store_true", help="resume from the run folder's newest checkpoint")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    from dlightning.config import load_config
    from dlightning.train import fit

    torch.set_num_threads(1)
    cfg = load_config([DEMO_CONFIG], args.overrides)
    fit(cfg, fresh=not args.resume, callbacks=[StepDump(args.dump)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
