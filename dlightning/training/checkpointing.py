"""Crash-safe checkpoint files: atomic durable writes, step checkpoints and the resume-path resolver.

Contract with the LightningModule (any module works with these pieces):

* ``pl_module.optimizer_step`` is an ``int`` attribute counting completed optimizer steps (the
  module's own counter, not ``trainer.global_step``). :class:`StepCheckpoint` and the preemption
  callback read it; the module must restore it in ``on_load_checkpoint`` from
  ``checkpoint["dlightning"]["optimizer_step"]``.
* Every checkpoint carries a ``"dlightning"`` block (a dict of plain Python types) with at least
  ``optimizer_step``. :func:`ensure_dlightning_block` adds it from the callbacks' ``on_save_checkpoint``
  hook; the module may extend it in its own ``on_save_checkpoint`` (which Lightning calls after the
  callbacks').
* Checkpoints hold only plain types and tensors so that ``torch.load(weights_only=True)`` reads them;
  the resolver validates with exactly that call.

Under DeepSpeed a checkpoint is a directory (``latest`` names a tag folder holding
``mp_rank_00_model_states.pt`` with the trainable weights and our block, and one
``zero_pp_rank_<r>_mp_rank_00_optim_states.pt`` per rank). :func:`save_checkpoint_atomically` writes
it under ``<name>.tmp`` and renames it once every rank has finished, so a crash never leaves a
half-written directory under a checkpoint name; the resolver checks every part is there.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.plugins.io import TorchCheckpointIO

from dlightning.errors import ConfigError, MissingWeightsError
from dlightning.utils.logging import get_logger

log = get_logger(__name__)

BLOCK_KEY = "dlightning"
"""Key of our own block inside a Lightning checkpoint."""
REQUIRED_KEYS = ("state_dict", "optimizer_states", BLOCK_KEY)
CHECKPOINT_SUBDIR = "checkpoints"
_CANDIDATE_GLOBS = ("hpc_ckpt_*.ckpt", "last.ckpt", "step-*.ckpt", "on_exception.ckpt", "preempt-*.ckpt")
_STEP_NAME = re.compile(r"^(?:step|preempt)-(\d+)\.ckpt$")
WANDB_ID_FILE = "wandb_run_id"


def checkpoint_dir(run_dir: str | os.PathLike[str]) -> Path:
    """Return ``<run_dir>/checkpoints``, the one folder every checkpoint of a run is written to."""
    return Path(run_dir) / CHECKPOINT_SUBDIR


def step_checkpoint_name(step: int, prefix: str = "step") -> str:
    """File name of the checkpoint taken after ``step`` optimizer steps, e.g. ``step-00000500.ckpt``."""
    return f"{prefix}-{step:08d}.ckpt"


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
    ``.tmp`` leftover is ignored by :func:`resolve_resume_checkpoint` and removed by the next save.
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


@dataclass(frozen=True)
class _Candidate:
    path: Path
    optimizer_step: int
    mtime: float


def _inspect_checkpoint(path: Path) -> _Candidate | None:
    """Load ``path`` the safe way; return it as a candidate, or None (with a warning) when unusable."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        log.warning("Ignoring unreadable checkpoint %s (%s: %s)", path, type(err).__name__, err)
        return None
    missing = [key for key in REQUIRED_KEYS if not isinstance(ckpt, dict) or key not in ckpt]
    if missing:
        log.warning("Ignoring checkpoint %s: missing keys %s", path, missing)
        return None
    step = ckpt[BLOCK_KEY].get("optimizer_step") if isinstance(ckpt[BLOCK_KEY], dict) else None
    if isinstance(step, bool) or not isinstance(step, int):
        log.warning("Ignoring checkpoint %s: %s.optimizer_step is not an int (%r)", path, BLOCK_KEY, step)
        return None
    return _Candidate(path, step, path.stat().st_mtime)


def _inspect_sharded_checkpoint(path: Path) -> _Candidate | None:
    """Validate a DeepSpeed checkpoint directory: tag, model states with our block, one optimizer shard
    per rank."""
    try:
        states_path = sharded_model_states(path)
        states = torch.load(states_path, map_location="cpu", weights_only=True, mmap=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as err:
        log.warning("Ignoring checkpoint directory %s (%s: %s)", path, type(err).__name__, err)
        return None
    block = states.get(BLOCK_KEY) if isinstance(states, dict) else None
    step = block.get("optimizer_step") if isinstance(block, dict) else None
    if "module" not in states or isinstance(step, bool) or not isinstance(step, int):
        log.warning("Ignoring checkpoint directory %s: no weights or no %s.optimizer_step", path, BLOCK_KEY)
        return None
    world = int(states.get("dp_world_size", 1))
    shards = [states_path.parent / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world)]
    missing = [s.name for s in shards if not s.is_file() or s.stat().st_size == 0]
    if missing:
        log.warning("Ignoring checkpoint directory %s: optimizer shards missing or empty: %s", path, missing)
        return None
    return _Candidate(path, step, states_path.stat().st_mtime)


def sharded_model_states(path: str | os.PathLike[str]) -> Path:
    """``mp_rank_00_model_states.pt`` of a DeepSpeed checkpoint directory (via its ``latest`` tag).

    Raises:
        FileNotFoundError: the directory has no ``latest`` file or no model states under that tag.
    """
    folder = Path(path)
    tag = (folder / "latest").read_text(encoding="utf-8").strip()
    states = folder / tag / "mp_rank_00_model_states.pt"
    if not states.is_file():
        raise FileNotFoundError(f"{states} does not exist")
    return states


def read_checkpoint_payload(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a training checkpoint (file or DeepSpeed directory) as ``{"state_dict", "dlightning", ...}``.

    The state dict holds the trainable tensors under the LightningModule's parameter names.
    """
    path = Path(path)
    # mmap: reading the step or the config of a large checkpoint does not read its optimizer state
    if not path.is_dir():
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    states = torch.load(sharded_model_states(path), map_location="cpu", weights_only=True, mmap=True)
    return {**states, "state_dict": states["module"]}


def resolve_checkpoint_argument(path: str | os.PathLike[str]) -> Path:
    """What a user may pass as ``--checkpoint``: a checkpoint file or DeepSpeed directory (returned as
    is), or a run folder (its newest valid checkpoint, as resuming would pick).

    Raises:
        MissingWeightsError: nothing there, or a run folder without a valid checkpoint.
    """
    given = Path(path)
    if not given.exists():
        raise MissingWeightsError(f"checkpoint {str(given)!r} not found; pass a .ckpt from <run_dir>/checkpoints "
                                  "or the run folder itself")
    if given.is_file() or (given / "latest").is_file():
        return given
    newest = resolve_resume_checkpoint(given)
    if newest is None:
        raise MissingWeightsError(f"{given} is a folder without a valid checkpoint in {checkpoint_dir(given)}")
    return Path(newest)


def list_valid_checkpoints(run_dir: str | os.PathLike[str]) -> list[tuple[str, int]]:
    """All valid checkpoints of a run as ``(path, optimizer_step)``, oldest first (step, then mtime)."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    paths = sorted({p for pattern in _CANDIDATE_GLOBS for p in folder.glob(pattern)})
    candidates = [c for p in paths if (c := _inspect_sharded_checkpoint(p) if p.is_dir() else _inspect_checkpoint(p))]
    candidates.sort(key=lambda c: (c.optimizer_step, c.mtime))
    return [(str(c.path), c.optimizer_step) for c in candidates]


def resolve_resume_checkpoint(run_dir: str | os.PathLike[str]) -> str | None:
    """Pick the checkpoint to resume from: the newest valid one in ``<run_dir>/checkpoints``.

    Candidates are ``hpc_ckpt_*.ckpt``, ``last.ckpt``, ``step-*.ckpt``, ``on_exception.ckpt`` and
    ``preempt-*.ckpt``. A file is valid when ``torch.load(weights_only=True)`` reads it and it has
    ``state_dict``, ``optimizer_states`` and a ``dlightning`` block with an int ``optimizer_step``; a
    DeepSpeed directory when its model states load that way with the block and every rank's optimizer
    shard is there.
    Unreadable, truncated or foreign files are skipped with a warning, ``*.tmp`` files are never
    considered. The newest is the highest ``optimizer_step``, ties broken by modification time.
    Unlike Lightning's ``ckpt_path="last"`` this also sees SLURM (``hpc_ckpt_*``) and preemption files.

    Returns:
        The path to pass as ``trainer.fit(ckpt_path=...)``, or None for a fresh start.
    """
    found = list_valid_checkpoints(run_dir)
    if not found:
        log.info("No valid checkpoint in %s: starting from scratch", checkpoint_dir(run_dir))
        return None
    path, step = found[-1]
    log.info("Resuming from %s (optimizer step %d)", path, step)
    return path


def _step_from_name(path: Path) -> int | None:
    match = _STEP_NAME.match(path.name)
    return int(match.group(1)) if match else None


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
            (s, p) for p in self.dirpath.glob("step-*.ckpt") if (s := _step_from_name(p)) is not None
        )
        for _, old in steps[: max(0, len(steps) - self.keep)]:
            _remove_path(old)
        for old in self.dirpath.glob("preempt-*.ckpt"):
            s = _step_from_name(old)
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


def stable_run_id(run_dir: str | os.PathLike[str]) -> str:
    """Return the W&B run id of this run folder, creating ``<run_dir>/wandb_run_id`` on first use.

    Requeued SLURM jobs and manual restarts reuse the folder, so they log into the same W&B run
    (pass it as ``WandbLogger(id=..., resume="allow")``). Call it on rank 0 before the logger starts,
    or on all ranks of a shared filesystem (creation is exclusive, so racing ranks agree).
    """
    path = Path(run_dir) / WANDB_ID_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        # Write the id to a private file, then hard-link it into place: the link either creates the
        # complete file or fails because another process won the race, so nobody reads a half-written id.
        tmp = path.with_name(f"{WANDB_ID_FILE}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_text(uuid.uuid4().hex[:12] + "\n", encoding="utf-8")
        try:
            os.link(tmp, path)
        except FileExistsError:
            log.debug("%s was created concurrently; using the existing id", path)
        finally:
            tmp.unlink()
    run_id = path.read_text(encoding="utf-8").strip()
    if not run_id:
        raise ConfigError(f"{path} is empty; delete it to start a new W&B run id or write the id into it")
    return run_id
