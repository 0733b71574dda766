"""A tiny deterministic Lightning training used by the fault-tolerance tests (run as a script or imported).

The module follows the contract of dlightning.training.checkpointing / preemption: an int
``optimizer_step`` counter, an ``at_step_boundary`` flag, and a ``dlightning`` checkpoint block. Data is a
pure function of (step, micro-batch); the module's own randomness comes from a private generator whose
state is checkpointed (the global RNG is also consumed by DataLoader iterator creation, so it cannot be
relied on across a resume).

    python tests/helpers/toy_train.py --run-dir DIR --max-steps N [--resume] [--progress FILE]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dlightning.contracts.checkpoint_format import checkpoint_dir, resolve_resume_checkpoint
from dlightning.training.checkpointing import StepCheckpoint
from dlightning.training.preemption import PreemptionCallback
from dlightning.training.strategy import build_cluster_plugins


class _Indices(Dataset):
    """Placeholder batches: the module makes its data from the step, not from the loader."""

    def __len__(self) -> int:
        return 1_000_000

    def __getitem__(self, index: int) -> int:
        return index


class ToyModule(LightningModule):
    """Linear regression with AdamW, a LambdaLR schedule, gradient accumulation and input noise."""

    def __init__(self, accumulate: int = 2, progress: str | None = None, step_sleep: float = 0.0) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.accumulate = accumulate
        self.progress = Path(progress) if progress else None
        self.step_sleep = step_sleep
        torch.manual_seed(0)
        self.layer = nn.Linear(8, 1)
        self.optimizer_step = 0
        self.at_step_boundary = False
        self._micro = 0
        self._gen = torch.Generator().manual_seed(7)
        self.batches_this_process = 0

    def _data(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(1000 * self.optimizer_step + self._micro)
        x = torch.randn(4, 8, generator=g)
        y = x.sum(dim=1, keepdim=True) * 0.5 + 1.0
        noise = 0.01 * torch.randn(x.shape, generator=self._gen)
        return x + noise, y

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        x, y = self._data()
        loss = nn.functional.mse_loss(self.layer(x), y) / self.accumulate
        self.manual_backward(loss)
        self.batches_this_process += 1
        self._micro += 1
        self.at_step_boundary = self._micro == self.accumulate
        if self.at_step_boundary:
            opt.step()
            opt.zero_grad(set_to_none=True)
            self.lr_schedulers().step()
            self._micro = 0
            self.optimizer_step += 1
            if self.progress is not None:
                self.progress.write_text(str(self.optimizer_step))
            if self.step_sleep:
                time.sleep(self.step_sleep)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=0.05)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.01 * s))
        return [opt], [sched]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        block = checkpoint.setdefault("dlightning", {})
        block.update(optimizer_step=self.optimizer_step, micro=self._micro, rng=self._gen.get_state())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        block = checkpoint["dlightning"]
        self.optimizer_step = block["optimizer_step"]
        self._micro = block["micro"]
        self._gen.set_state(block["rng"])


def train(
    run_dir: str | Path,
    max_steps: int,
    *,
    resume: bool = False,
    progress: str | None = None,
    step_sleep: float = 0.0,
    every: int = 3,
    keep: int = 2,
    accumulate: int = 2,
) -> ToyModule:
    """Train the toy for ``max_steps`` optimizer steps with our callbacks and plugins; return the module."""
    ckpt_dir = checkpoint_dir(run_dir)
    module = ToyModule(accumulate=accumulate, progress=progress, step_sleep=step_sleep)
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(run_dir),
        deterministic=True,
        callbacks=[StepCheckpoint(ckpt_dir, every=every, keep=keep), PreemptionCallback(ckpt_dir)],
        plugins=build_cluster_plugins(),
    )
    ckpt_path = resolve_resume_checkpoint(run_dir) if resume else None
    trainer.fit(module, DataLoader(_Indices(), batch_size=1), ckpt_path=ckpt_path)
    return module


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: train and write the final weights to ``<run_dir>/final.pt``."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--max-steps", type=int, required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--progress")
    parser.add_argument("--step-sleep", type=float, default=0.0)
    args = parser.parse_args(argv)
    module = train(
        args.run_dir, args.max_steps, resume=args.resume, progress=args.progress, step_sleep=args.step_sleep
    )
    torch.save(
        {
            "state_dict": module.layer.state_dict(),
            "optimizer_step": module.optimizer_step,
            "batches_this_process": module.batches_this_process,
        },
        Path(args.run_dir) / "final.pt",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
