"""What a training checkpoint holds, where a run keeps them, and the one reader of them.

A checkpoint is a Lightning checkpoint file, or under DeepSpeed a directory, that holds:

* ``state_dict``: only the tensors training changes (both LoRA families, CFR, conv_in), under the
  LightningModule's parameter names (``generator.<...>``);
* ``optimizer_states`` (files) or one optimizer shard per rank (DeepSpeed directories);
* a ``"dlightning"`` block of plain Python types with at least ``optimizer_step`` (the module's own
  counter), and, from the LightningModule, ``micro_step``, the per-rank RNG states and ``config``
  (the resolved RootConfig as a dict), and ``ema`` (the moving average of the trainable tensors, under
  the same names as ``state_dict``) when ``optim.ema.enabled``.

Only plain types and tensors go in, so ``torch.load(weights_only=True)`` reads every checkpoint; the
validity checks use exactly that call. A DeepSpeed directory has a ``latest`` file naming a tag
folder with ``mp_rank_00_model_states.pt`` (weights and our block) and the optimizer shards.

Resume, ``export`` and ``validate`` all go through :func:`read_training_checkpoint`, which reads a
checkpoint once (memory-mapped: reading the config does not read the optimizer state).
"""

from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dlightning.errors import MissingWeightsError
from dlightning.utils.logging import get_logger

log = get_logger(__name__)

BLOCK_KEY = "dlightning"
"""Key of our own block inside a Lightning checkpoint."""
REQUIRED_KEYS = ("state_dict", "optimizer_states", BLOCK_KEY)
CHECKPOINT_SUBDIR = "checkpoints"
CANDIDATE_GLOBS = ("hpc_ckpt_*.ckpt", "last.ckpt", "step-*.ckpt", "on_exception.ckpt", "preempt-*.ckpt")
"""Names a run's checkpoints may have (ours, Lightning's SLURM ones, pre-emption ones)."""
_STEP_NAME = re.compile(r"^(?:step|preempt)-(\d+)\.ckpt$")
GENERATOR_PREFIX = "generator."
"""Prefix of the generator's tensors in ``state_dict`` (and in the block's ``ema``)."""
WEIGHT_KINDS = ("raw", "ema")
"""Which trained tensors a reader takes: the weights, or their moving average (block key ``ema``)."""


def checkpoint_dir(run_dir: str | os.PathLike[str]) -> Path:
    """Return ``<run_dir>/checkpoints``, the one folder every checkpoint of a run is written to."""
    return Path(run_dir) / CHECKPOINT_SUBDIR


def step_checkpoint_name(step: int, prefix: str = "step") -> str:
    """File name of the checkpoint taken after ``step`` optimizer steps, e.g. ``step-00000500.ckpt``."""
    return f"{prefix}-{step:08d}.ckpt"


def step_from_name(path: Path) -> int | None:
    """The optimizer step in a ``step-N.ckpt`` / ``preempt-N.ckpt`` name, else None."""
    match = _STEP_NAME.match(path.name)
    return int(match.group(1)) if match else None


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
    found = list_valid_checkpoints(given)  # not resolve_resume_checkpoint: nothing resumes here
    if not found:
        raise MissingWeightsError(f"{given} is a folder without a valid checkpoint in {checkpoint_dir(given)}")
    log.info("Using %s, the newest checkpoint of %s (optimizer step %d)", found[-1][0], given, found[-1][1])
    return Path(found[-1][0])


def list_valid_checkpoints(run_dir: str | os.PathLike[str]) -> list[tuple[str, int]]:
    """All valid checkpoints of a run as ``(path, optimizer_step)``, oldest first (step, then mtime)."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    paths = sorted({p for pattern in CANDIDATE_GLOBS for p in folder.glob(pattern)})
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


@dataclass(frozen=True)
class TrainingCheckpoint:
    """A training checkpoint read once: where it is, its trainable tensors, its block and its config."""

    path: Path
    state_dict: dict[str, torch.Tensor]
    block: dict[str, Any]

    @property
    def config(self) -> dict[str, Any]:
        """The resolved RootConfig the run trained with, as plain types."""
        return self.block["config"]

    @property
    def optimizer_step(self) -> int:
        """Optimizer steps completed when the checkpoint was taken."""
        return int(self.block["optimizer_step"])

    def generator_tensors(self, weights: str = "raw") -> dict[str, torch.Tensor]:
        """The generator's trainable tensors, keyed by the generator's own parameter names.

        Args:
            weights: ``raw`` (the trained weights) or ``ema`` (their moving average, ``optim.ema``).

        Raises:
            MissingWeightsError: ``ema`` asked of a checkpoint trained without ``optim.ema.enabled``.
        """
        if weights not in WEIGHT_KINDS:
            raise ValueError(f"weights={weights!r}; choose one of {list(WEIGHT_KINDS)}")
        source = self.state_dict
        if weights == "ema":
            source = self.block.get("ema") or {}
            if not source:
                raise MissingWeightsError(f"{self.path} holds no EMA weights (it was trained with "
                                          "optim.ema.enabled=false); use the raw weights")
        n = len(GENERATOR_PREFIX)
        return {k[n:]: v for k, v in source.items() if k.startswith(GENERATOR_PREFIX)}


def read_training_checkpoint(path: str | os.PathLike[str]) -> TrainingCheckpoint:
    """Read a dlightning training checkpoint once.

    Args:
        path: A ``.ckpt`` file or a DeepSpeed checkpoint directory (read with ``weights_only=True``),
            or a run folder (its newest valid checkpoint, as resuming would pick).

    Raises:
        MissingWeightsError: Nothing there, a file torch cannot read (truncated, empty, a refused
            pickle), or a file that is not a dlightning training checkpoint.
    """
    resolved = resolve_checkpoint_argument(path)
    try:
        payload = read_checkpoint_payload(resolved)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as err:
        raise MissingWeightsError(f"cannot read checkpoint {resolved} ({type(err).__name__}: "
                                  f"{str(err).splitlines()[0] if str(err) else ''}); it is truncated, "
                                  "not a torch checkpoint, or holds objects other than tensors and plain types; "
                                  "pass another checkpoint") from err
    block = payload.get(BLOCK_KEY) if isinstance(payload, dict) else None
    if not isinstance(block, dict) or "state_dict" not in payload or "config" not in block:
        raise MissingWeightsError(f"{resolved} is not a dlightning training checkpoint (no state_dict or "
                                  f"{BLOCK_KEY}.config); for the authors' model.pkl use --reference-pkl")
    return TrainingCheckpoint(resolved, payload["state_dict"], block)
