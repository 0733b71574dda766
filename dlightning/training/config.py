"""Config sections of training: phase schedule, optimisation and the trainer."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from dlightning.contracts.config_io import check_choice, check_range
from dlightning.contracts.phases import LOSS_TERMS, PARAM_GROUPS, PHASES
from dlightning.errors import ConfigError


@dataclass
class SegmentConfig:
    """One stretch of the phase schedule.

    The segment covers optimizer steps (previous end, end] (the first one [0, end]); ``end`` null means
    forever. Its loss weights ramp linearly from the previous segment's weights over ``ramp`` steps:
    at step s = start + k (1 <= k <= ramp) the progress is k / ramp.
    """

    phase: str = "consistency"
    end: int | None = None
    ramp: int = 0
    weights: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_choice("schedule.segments[]", "phase", self.phase, PHASES)
        unknown = set(self.weights) - set(LOSS_TERMS)
        if unknown:
            raise ConfigError(
                f"schedule.segments[].weights has unknown keys {sorted(unknown)}; valid: {list(LOSS_TERMS)}"
            )


@dataclass
class ScheduleConfig:
    """Phase schedule as a pure function of the optimizer step (see dlightning.training.schedule).

    The default (``preset: custom`` with the default ``segments``) is a short two-phase run for demos
    and small experiments: consistency for steps [0, 999] (1000 steps), then detail forever with a
    100-step linear ramp of the weights (CSD ramps in from 0). Use ``preset: reference`` for the
    docs/METHOD.md 4.3 schedule (5000 C / 8000 D / 5000 C / D, 1000-step ramps).
    """

    preset: str = "custom"
    """reference: docs/METHOD.md 4.3 exactly (``segments`` ignored); custom: use ``segments``."""
    segments: list[SegmentConfig] = field(default_factory=lambda: [
        SegmentConfig(phase="consistency", end=999,
                      weights={"l2": 1.0, "lpips": 2.0, "csd": 0.0, "temporal": 1.0}),
        SegmentConfig(phase="detail", end=None, ramp=100,
                      weights={"l2": 1.0, "lpips": 2.0, "csd": 1.0, "temporal": 1.0}),
    ])
    """Segments in order; ends strictly increasing, only the last may be null (open-ended)."""

    def __post_init__(self) -> None:
        check_choice("schedule", "preset", self.preset, ("reference", "custom"))
        if self.preset == "custom":
            validate_segments(self.segments)


LR_SCHEDULES = ("constant", "cosine", "linear")


@dataclass
class EMAConfig:
    """An exponential moving average of the trainable tensors (see dlightning.training.ema)."""

    enabled: bool = False
    decay: float = 0.999
    """Weight of the old average at each optimizer step: ema = decay * ema + (1 - decay) * weights."""
    start_step: int = 0
    """Optimizer step from which the average starts; before it the average follows the weights."""

    def __post_init__(self) -> None:
        check_range("optim.ema", "decay", self.decay, low=0, high=1)
        check_range("optim.ema", "start_step", self.start_step, low=0)


@dataclass
class OptimConfig:
    """One AdamW with named parameter groups (c_lora, cfr, d_lora, conv_in); a phase steps its groups."""

    lr: float = 5e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1e-2
    eps: float = 1e-8
    accumulate: int = 1
    """Micro-batches per optimizer step."""
    clip_norm: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PARAM_GROUPS, 1.0))
    """Max gradient norm per group (0 = no clipping). Parity: only d_lora at 1.0."""
    reset_moments_on_phase_entry: bool = False
    """Clear the Adam moments of the groups that become active when a phase starts (reference: keep)."""
    mask_mode: str = "auto"
    """How inactive groups are held still: drop_grad (grad = None: no update, no decay, moments
    untouched), zero_lr (lr 0 for inactive groups; needed under DeepSpeed), auto (zero_lr under a
    deepspeed strategy, else drop_grad); resolved when the config loads."""
    lr_schedule: str = "constant"
    """constant | cosine | linear: how each group's learning rate decays from its base value after the
    warm-up, over the optimizer steps up to ``trainer.max_steps``."""
    warmup_steps: int = 0
    """Optimizer steps of linear warm-up from lr / warmup_steps to the base lr (0 = none)."""
    min_lr_ratio: float = 0.0
    """Final learning rate of the cosine and linear schedules, as a fraction of the base lr."""
    group_lr: dict[str, float] = field(default_factory=dict)
    """Base learning rate per group (c_lora, cfr, d_lora, conv_in); groups not named use ``lr``."""
    ema: EMAConfig = field(default_factory=EMAConfig)

    def __post_init__(self) -> None:
        check_choice("optim", "mask_mode", self.mask_mode, ("auto", "drop_grad", "zero_lr"))
        check_choice("optim", "lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_range("optim", "warmup_steps", self.warmup_steps, low=0)
        check_range("optim", "min_lr_ratio", self.min_lr_ratio, low=0, high=1)
        unknown_lr = set(self.group_lr) - set(PARAM_GROUPS)
        if unknown_lr:
            raise ConfigError(f"optim.group_lr has unknown groups {sorted(unknown_lr)}; valid: {list(PARAM_GROUPS)}")
        for group, value in self.group_lr.items():
            check_range("optim.group_lr", group, value, low=0, low_open=True)
        if self.accumulate < 1:
            raise ConfigError("optim.accumulate must be >= 1")
        unknown = set(self.clip_norm) - set(PARAM_GROUPS)
        if unknown:
            raise ConfigError(f"optim.clip_norm has unknown groups {sorted(unknown)}; valid: {list(PARAM_GROUPS)}")
        check_range("optim", "lr", self.lr, low=0, low_open=True)
        check_range("optim", "weight_decay", self.weight_decay, low=0)
        check_range("optim", "eps", self.eps, low=0, low_open=True)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas={list(self.betas)} must be two values in [0, 1), e.g. [0.9, 0.999]")
        for group, limit in self.clip_norm.items():
            check_range("optim.clip_norm", group, limit, low=0)


OWNED_TRAINER_ARGS: dict[str, str] = {
    "max_epochs": "training length is trainer.max_steps (optimizer steps, which the phase schedule counts)",
    "min_epochs": "training length is trainer.max_steps (optimizer steps, which the phase schedule counts)",
    "min_steps": "training length is trainer.max_steps (optimizer steps, which the phase schedule counts)",
    "logger": "set logging.backend (one or a list of wandb, tensorboard, csv)",
    "plugins": "dlightning sets the checkpoint IO (atomic saves) and the cluster environment itself",
    "enable_checkpointing": "checkpoints are dlightning's own (trainer.checkpoint_every, trainer.keep_checkpoints)",
    "default_root_dir": "set trainer.run_dir",
    "log_every_n_steps": "set trainer.log_every (optimizer steps)",
    "use_distributed_sampler": "the loader splits the data across ranks itself",
    "accumulate_grad_batches": "set optim.accumulate (the module accumulates under manual optimisation)",
    "gradient_clip_val": "set optim.clip_norm (per group; Lightning cannot clip under manual optimisation)",
    "gradient_clip_algorithm": "set optim.clip_norm (per group; Lightning cannot clip under manual optimisation)",
    "barebones": "dlightning's checkpoints, progress and logging need the full Trainer",
}
"""Lightning Trainer arguments dlightning sets itself, with what to use instead."""


def lightning_trainer_args() -> set[str]:
    """The keyword arguments of ``lightning.Trainer`` a config may pass through ``trainer.<name>``."""
    import inspect

    from lightning.pytorch import Trainer

    own = {f for f in TrainerConfig.__dataclass_fields__}
    return {name for name in inspect.signature(Trainer.__init__).parameters if name != "self"} - own


@dataclass
class TrainerConfig:
    """Run-level settings passed to Lightning's Trainer and the run folder.

    Any other ``lightning.Trainer`` argument may be given as ``trainer.<name>`` (e.g.
    ``trainer.profiler=simple``, ``trainer.detect_anomaly=true``, ``trainer.fast_dev_run=true``); it is
    checked against the Trainer's signature and kept in ``trainer.lightning``. The ones dlightning must
    own (:data:`OWNED_TRAINER_ARGS`) are refused with what to set instead.
    """

    __extra_keys__: ClassVar[tuple[str, Callable[[], set[str]]]] = ("lightning", lightning_trainer_args)

    run_dir: str = "runs/default"
    max_steps: int = 1000
    """Optimizer steps to train (the module's own counter)."""
    accelerator: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"
    """auto | ddp | deepspeed_stage_2 (see dlightning.training.strategy)."""
    precision: str = "32-true"
    """32-true | bf16-mixed | 16-mixed (trainable weights stay fp32)."""
    seed: int = 1234
    checkpoint_every: int = 500
    """Save a checkpoint every N optimizer steps (and at the end)."""
    keep_checkpoints: int = 2
    max_nonfinite_steps: int = 5
    """Stop with an error after this many consecutive non-finite losses."""
    log_every: int = 10
    deterministic: bool = False
    grad_sync: str = "auto"
    """DDP gradient all-reduce: active (only the current phase's groups; needs drop_grad masking),
    all (every trainable tensor), auto (active where drop_grad masking is in use, else all).
    Resolved when the config loads. See dlightning.training.grad_sync."""
    grad_sync_dtype: str = "fp32"
    """Dtype of the DDP gradient all-reduce: fp32 (exact) or bf16 (half the bytes)."""
    tf32: bool = False
    """Let CUDA matmuls and convolutions use TF32 (Ampere and newer: faster, about 1e-3 relative error)."""
    callbacks: list[Any] = field(default_factory=list)
    """Extra Lightning callbacks in LightningCLI's form: ``{class_path: lightning.pytorch.callbacks.EarlyStopping,
    init_args: {monitor: train/loss, patience: 3}}``; they monitor the ``train/...`` metrics."""
    lightning: dict[str, Any] = field(default_factory=dict)
    """Further ``lightning.Trainer`` arguments, passed as they are (``trainer.<name>`` lands here)."""

    def __post_init__(self) -> None:
        check_precision(self.precision)
        for name in self.lightning:
            if name in OWNED_TRAINER_ARGS:
                raise ConfigError(f"trainer.{name} is set by dlightning: {OWNED_TRAINER_ARGS[name]}")
        for i, spec in enumerate(self.callbacks):
            if not isinstance(spec, dict) or "class_path" not in spec or set(spec) - {"class_path", "init_args"}:
                raise ConfigError(f"trainer.callbacks.{i} must be {{class_path: module.Class, init_args: {{...}}}}, "
                                  f"got {spec!r}")
        check_choice("trainer", "grad_sync", self.grad_sync, ("auto", "active", "all"))
        check_choice("trainer", "grad_sync_dtype", self.grad_sync_dtype, ("fp32", "bf16"))
        for key in ("max_steps", "devices", "num_nodes", "checkpoint_every", "keep_checkpoints",
                    "max_nonfinite_steps", "log_every"):
            check_range("trainer", key, getattr(self, key), low=1)
        check_range("trainer", "seed", self.seed, low=0)


PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16", "16-mixed", "16")
"""Lightning precisions the method trains with: the trainable tensors stay fp32 under every one."""
REFUSED_PRECISIONS = {
    "bf16-true": "it casts the trainable LoRA tensors to bf16, whose 8-bit mantissa rounds away AdamW updates "
                 "at the method's learning rates (5e-5 relative steps); use bf16-mixed (frozen parts bf16, "
                 "trainable tensors fp32)",
    "16-true": "fp16 weights without loss scaling underflow in the LoRA updates; use 16-mixed or bf16-true",
    "64-true": "the Stable Diffusion weights and kernels are not made for fp64; use 32-true",
    "64": "the Stable Diffusion weights and kernels are not made for fp64; use 32-true",
    "transformer-engine": "Transformer Engine layers are not used by the UNet; use bf16-mixed",
    "transformer-engine-float16": "Transformer Engine layers are not used by the UNet; use 16-mixed",
}


def check_precision(precision: str) -> None:
    """Refuse a ``trainer.precision`` the method cannot train with, naming why and what to use."""
    if precision in REFUSED_PRECISIONS:
        raise ConfigError(f"trainer.precision={precision!r}: {REFUSED_PRECISIONS[precision]}")
    check_choice("trainer", "precision", precision, PRECISIONS)


DEEPSPEED_PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16")


def global_clip_norm(clip_norm: dict[str, float]) -> float:
    """The one global max norm DeepSpeed applies, from the per-group ``optim.clip_norm``.

    Raises:
        ConfigError: when the groups ask for different non-zero limits (DeepSpeed cannot honour them).
    """
    limits = {float(v) for v in clip_norm.values()}
    if not limits or limits == {0.0}:
        return 0.0
    if len(limits) > 1:
        raise ConfigError(
            f"optim.clip_norm={dict(clip_norm)} asks for per-group limits, but DeepSpeed ZeRO clips one "
            "global norm over all trainable tensors: give every group the same value (or 0 everywhere), "
            "or use trainer.strategy=ddp"
        )
    return limits.pop()


def check_deepspeed_precision(precision: str) -> None:
    """Refuse precisions the DeepSpeed path does not support, naming the ones it does."""
    if precision not in DEEPSPEED_PRECISIONS:
        raise ConfigError(
            f"trainer.precision={precision!r} is not supported with trainer.strategy=deepspeed_stage_2 "
            "(fp16 autocast needs a loss scaler that DeepSpeed does not apply under ZeRO); use bf16-mixed "
            "or 32-true"
        )


def resolve_grad_sync(trainer: TrainerConfig, optim: OptimConfig) -> str:
    """``active`` or ``all`` for ``trainer.grad_sync`` (``auto``: active wherever drop_grad masking is used).

    Raises:
        ConfigError: ``active`` asked for where the inactive groups' gradients are not dropped.
    """
    drops = not trainer.strategy.startswith("deepspeed") and optim.mask_mode in ("auto", "drop_grad")
    if trainer.grad_sync == "auto":
        return "active" if drops else "all"
    if trainer.grad_sync == "active" and not drops:
        raise ConfigError(
            "trainer.grad_sync=active leaves the inactive groups' gradients unsynchronised, which is only "
            f"safe when they are dropped (optim.mask_mode=drop_grad under DDP), not with "
            f"optim.mask_mode={optim.mask_mode!r} and trainer.strategy={trainer.strategy!r}; "
            "use trainer.grad_sync=all or auto"
        )
    return trainer.grad_sync


def resolve_mask_mode(mask_mode: str, strategy: str) -> str:
    """``drop_grad`` or ``zero_lr`` for ``optim.mask_mode`` under ``trainer.strategy``.

    ``auto`` is ``zero_lr`` under DeepSpeed, whose partitioned gradients cannot be dropped per group,
    and ``drop_grad`` everywhere else; a concrete mode is returned as it is. RootConfig resolves it
    when the config loads; the module calls it only for sections built by hand.
    """
    if mask_mode != "auto":
        return mask_mode
    return "zero_lr" if strategy.startswith("deepspeed") else "drop_grad"


def check_deepspeed_limits(trainer: TrainerConfig, optim: OptimConfig) -> None:
    """Refuse settings DeepSpeed ZeRO-2 cannot honour, each error naming the fix.

    ZeRO-2 partitions gradients: DDP-style ``no_sync`` accumulation, per-group gradient dropping and
    per-group clipping are not available there (docs/INTEGRATION.md C1).
    """
    if not trainer.strategy.startswith("deepspeed"):
        return
    if optim.accumulate != 1:
        raise ConfigError("optim.accumulate must be 1 under trainer.strategy=deepspeed_*: raise "
                          "data.batch_size instead, or use trainer.strategy=ddp")
    if optim.mask_mode == "drop_grad":
        raise ConfigError("optim.mask_mode=drop_grad cannot work under DeepSpeed ZeRO (gradients are "
                          "partitioned); use auto or zero_lr")
    check_deepspeed_precision(trainer.precision)
    global_clip_norm(optim.clip_norm)


def _segment_length(segments: list[SegmentConfig], index: int) -> float:
    end = segments[index].end
    if end is None:
        return math.inf
    start = -1 if index == 0 else segments[index - 1].end
    return end - start


def validate_segments(segments: list[SegmentConfig]) -> None:
    """Raise ConfigError naming ``schedule.segments.<i>.<key>`` when the segments are inconsistent."""
    if not segments:
        raise ConfigError("schedule.segments is empty; give at least one segment (the last with end: null)")
    previous_end = -1
    for i, seg in enumerate(segments):
        is_last = i == len(segments) - 1
        if seg.end is None and not is_last:
            raise ConfigError(
                f"schedule.segments.{i}.end is null but only the last segment may be open-ended"
            )
        if seg.end is not None and seg.end <= previous_end:
            bound = "must be >= 0" if i == 0 else f"must be > schedule.segments.{i - 1}.end={previous_end}"
            raise ConfigError(f"schedule.segments.{i}.end={seg.end} {bound} (ends strictly increasing)")
        if seg.ramp < 0:
            raise ConfigError(f"schedule.segments.{i}.ramp={seg.ramp} must be >= 0")
        if i == 0 and seg.ramp != 0:
            raise ConfigError(
                "schedule.segments.0.ramp must be 0: the first segment has no weights to ramp from"
            )
        if seg.ramp > _segment_length(segments, i):
            raise ConfigError(
                f"schedule.segments.{i}.ramp={seg.ramp} exceeds the segment length "
                f"{_segment_length(segments, i)}; shorten the ramp or move schedule.segments.{i}.end"
            )
        for key, value in seg.weights.items():
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"schedule.segments.{i}.weights.{key}={value} must be finite and >= 0")
        if seg.end is not None:
            previous_end = seg.end
