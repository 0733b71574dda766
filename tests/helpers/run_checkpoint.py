"""A run folder holding a training checkpoint of a given generator, written without training (export tests)."""

from __future__ import annotations

from pathlib import Path

import torch


def write_run_checkpoint(gen, run_dir: Path, model_cfg, step: int = 3) -> Path:
    """``run_dir/checkpoints/step-N.ckpt`` with the trainable tensors of ``gen`` and a stored RootConfig.

    The stored config has ``model=model_cfg`` and ``trainer.run_dir=run_dir``; the file is what
    ``read_training_checkpoint`` reads (``state_dict``, ``optimizer_states``, the ``dlightning`` block).
    """
    from dlightning.config import RootConfig, to_container

    root = RootConfig(model=model_cfg)
    root.trainer.run_dir = str(run_dir)
    trainable = {f"generator.{n}": p.detach().clone() for n, p in gen.named_parameters() if p.requires_grad}
    ckpt = run_dir / "checkpoints" / f"step-{step:08d}.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"state_dict": trainable, "optimizer_states": [],
                "dlightning": {"config": to_container(root), "optimizer_step": step}}, ckpt)
    return ckpt
