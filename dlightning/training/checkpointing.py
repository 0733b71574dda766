"""Crash-safe checkpoint writing: atomic durable files and directories, and step checkpoints.

What a checkpoint holds and how one is read and validated is the contract in
:mod:`dlightning.contracts.checkpoint_format`. Contract with the LightningModule (any module works
with these pieces): ``pl_module.optimizer_step`` is an ``int`` attribute counting completed optimizer
steps (the module's own counter, not ``trainer.global_step``); :class:`StepCheckpoint` and the
pre-emption callback read it, and the module restores it in ``on_load_checkpoint``.
:func:`ensure_dlightning_block` adds the block from the callbacks' ``on_save_checkpoint`` hook; the
module extends it in its own ``on_save_checkpoint`` (which Lightning calls after the callbacks').

Under DeepSpeed a checkpoint is a directory; :func:`save_checkpoint_atomically` writes it under
``<name>.tmp`` and renames it once every rank has finished, so a crash never leaves a half-written
directory under a checkpoint name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.plugins.io import TorchCheckpointIO

from dlightning.contracts.checkpoint_format import BLOCK_KEY, step_checkpoint_name, step_from_name
from dlightning.errors import ConfigError
from dlightning.utils.logging import get_logger

log = get_logger(__name__)

def read_optimizer_step(pl_module: LightningModule) -> int:
    """Read the module's own optimizer-step counter, with an actionable error when it is missing."""
    value = getattr(pl_module, "optimizer_step", None)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{type(pl_module).__name__}.optimizer_step must be an int attribute counting completed "
            f"optimizer steps (got {type(value).__name__}); set it in __init__ and increment it after each "
            "optimizer step"
        )
    return value


def ensure_dlightning_block(checkpoint: dict[str, Any], pl_module: LightningModule) -> dict[str, Any]:
    """Add our block with the module's ``optimizer_step`` to a checkpoint dict if it is not there yet."""
    block = checkpoint.setdefault(BLOCK_KEY, {})
    block.setdefault("optimizer_step", read_optimizer_step(pl_module))
    return block


def _fsync_dir(directory: Path) -> None:
    # A rename is only durable once the directory entry is on disk; not every OS lets us open a folder.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as err:  # some network filesystems refuse fsync on directories
        log.debug("fsync of directory %s failed: %s", directory, err)
    finally:
        os.close(fd)


def _is_local(path: str | os.PathLike[str]) -> bool:
    text = str(path)
    return "://" not in text or text.startswith("file://")


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """Write ``obj`` with ``torch.save`` to ``<path>.tmp``, fsync it, rename over ``path``, fsync the folder.

    A crash at any point leaves either the previous file at ``path`` or the complete new one; the
    ``.tmp`` leftover is ignored by the checkpoint resolver and removed by the next save.
    """
    final = Path(str(path).removeprefix("file://"))
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(final.name + ".tmp")
    try:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(final.parent)


def atomic_copy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Copy a file to ``dst`` with the same tmp + fsync + rename discipline as :func:`atomic_torch_save`."""
    dst = Path(dst)
    tmp = dst.with_name(f"{dst.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout, length=16 << 20)
            fout.flush()
            os.fsync(fout.fileno())
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(dst.parent)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that makes each local checkpoint durable and all-or-nothing.

    Lightning's own ``TorchCheckpointIO`` renames a temp file but never fsyncs, so a node crash can
    leave a renamed but empty file. Pass ``Trainer(plugins=[AtomicCheckpointIO()])``. Remote URLs
    (``s3://``...) fall back to Lightning's implementation.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        """Save ``checkpoint`` to ``path`` atomically (see :func:`atomic_torch_save`)."""
        if storage_options is not None:
            raise TypeError(
                "AtomicCheckpointIO does not take storage_options; "
                "write a custom CheckpointIO if you need them"
            )
        if not _is_local(path):
            super().save_checkpoint(checkpoint, path)
            return
        atomic_torch_save(checkpoint, path)


def _remove_path(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


class StepCheckpoint(Callback):
    """Save ``step-{N:08d}.ckpt`` every ``every`` optimizer steps and point ``last.ckpt`` at it.

    The step is the module's ``optimizer_step`` attribute (see the module docstring), so gradient
    accumulation and skipped non-finite steps do not shift the schedule. ``trainer.save_checkpoint``
    is called on every rank (it is collective under DDP/DeepSpeed); only global rank 0 touches files.
    Only the newest ``keep`` step checkpoints are kept; preemption checkpoints older than a new step
    checkpoint are removed too.

    Args:
        dirpath: folder for the files, normally ``checkpoint_dir(run_dir)``.
        every: save after every ``every``-th optimizer step.
        keep: how many ``step-*`` checkpoints to keep (>= 1).
        save_on_train_end: also save when training ends normally at a step not saved yet.
    """

    def __init__(
        self, dirpath: str | os.PathLike[str], *, every: int, keep: int = 2, save_on_train_end: bool = True
    ) -> None:
        if every < 1:
            raise ConfigError(f"checkpoint interval must be >= 1 optimizer step, got {every}")
        if keep < 1:
            raise ConfigError(f"keep_checkpoints must be >= 1, got {keep}")
        self.dirpath = Path(dirpath)
        self.every = every
        self.keep = keep
        self.save_on_train_end = save_on_train_end
        self._last_seen: int | None = None
        self._last_saved: int | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Remember the (possibly restored) step so a resumed run does not re-save it."""
        self._last_seen = read_optimizer_step(pl_module)
        self._last_saved = self._last_seen

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Save when the optimizer step advanced onto a multiple of ``every``."""
        step = read_optimizer_step(pl_module)
        advanced = self._last_seen is None or step != self._last_seen
        self._last_seen = step
        if advanced and step > 0 and step % self.every == 0 and step != self._last_saved:
            self.save(trainer, step)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Save the final step unless it was saved already or a preemption checkpoint covers it."""
        preempted = any(getattr(cb, "preempted", False) for cb in trainer.callbacks)
        step = read_optimizer_step(pl_module)
        if self.save_on_train_end and not preempted and step > 0 and step != self._last_saved:
            self.save(trainer, step)

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Make sure every checkpoint (ours, Lightning's or another callback's) has the dlightning block."""
        ensure_dlightning_block(checkpoint, pl_module)

    def save(self, trainer: Trainer, step: int) -> None:
        """Write ``step-N.ckpt``, refresh ``last.ckpt`` (files only) and prune; call on all ranks.

        A sharded (DeepSpeed) run gets no ``last.ckpt``: copying a directory atomically costs a second
        full write, and the resolver finds the newest step directory by itself.
        """
        path = self.dirpath / step_checkpoint_name(step)
        save_checkpoint_atomically(trainer, path)
        self._last_saved = step
        if not _is_sharded(trainer) and trainer.is_global_zero:
            atomic_copy(path, self.dirpath / "last.ckpt")
        if trainer.is_global_zero:
            self._prune(step)
        trainer.strategy.barrier("dlightning_step_checkpoint")

    def _prune(self, newest: int) -> None:
        steps = sorted(
            (s, p) for p in self.dirpath.glob("step-*.ckpt") if (s := step_from_name(p)) is not None
        )
        for _, old in steps[: max(0, len(steps) - self.keep)]:
            _remove_path(old)
        for old in self.dirpath.glob("preempt-*.ckpt"):
            s = step_from_name(old)
            if s is not None and s < newest:
                _remove_path(old)
        for stale in self.dirpath.glob("*.tmp"):
            _remove_path(stale)


def save_checkpoint_atomically(trainer: Trainer, path: str | os.PathLike[str]) -> None:
    """``trainer.save_checkpoint(path)`` on every rank, all-or-nothing for files and directories alike.

    A file goes through the strategy's checkpoint IO (:class:`AtomicCheckpointIO`). A sharded
    checkpoint directory is written by all ranks to ``<path>.tmp`` and fsynced by every rank; after a
    barrier rank 0 renames it to ``path``.
    """
    path = Path(path)
    if not _is_sharded(trainer):
        trainer.save_checkpoint(path, weights_only=False)
        return
    tmp = path.with_name(path.name + ".tmp")
    strategy = trainer.strategy
    if trainer.is_global_zero and tmp.exists():
        _remove_path(tmp)
    strategy.barrier("dlightning_checkpoint_tmp_clear")
    trainer.save_checkpoint(tmp, weights_only=False)
    _fsync_tree(tmp)  # every rank: on a multi-node filesystem each node flushes the shards it wrote
    strategy.barrier("dlightning_checkpoint_written")
    if trainer.is_global_zero:
        if path.exists():
            _remove_path(path)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    strategy.barrier("dlightning_checkpoint_renamed")


def _fsync_tree(folder: Path) -> None:
    """fsync every file and folder below ``folder`` (so the rename publishes complete data)."""
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(Path(root))


def _is_sharded(trainer: Trainer) -> bool:
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    return isinstance(trainer.strategy, (DeepSpeedStrategy, FSDPStrategy))
