"""The LightningModule: manual optimisation of the generator in two alternating phases.

The module only orchestrates. The generator, the loss terms (:class:`~dlightning.losses.DLoRALLoss`),
the phase schedule, the optimizer layout, the per-rank RNG state and the step metrics live in their
own modules. Per micro-batch it reads the phase and the loss weights from the schedule (a pure
function of its own optimizer-step counter), runs the generator on the windows (t-1, t) of the clip,
sums the weighted losses, back-propagates (without DDP gradient sync on accumulation steps) and, on
the last micro-batch of a step, drops the inactive groups' gradients, clips each active group and
steps. A non-finite loss on any rank makes every rank skip the step.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import lightning as L
import torch

from dlightning.contracts.checkpoint_format import BLOCK_KEY
from dlightning.contracts.phases import ACTIVE_GROUPS, CONSISTENCY, DETAIL
from dlightning.losses import CSDInputs, DLoRALLoss, weighted_total
from dlightning.losses.config import LossConfig
from dlightning.models.config import ModelConfig
from dlightning.models.generator import build_generator
from dlightning.training.config import OptimConfig, ScheduleConfig, TrainerConfig, resolve_mask_mode
from dlightning.training.ema import PhaseEMA
from dlightning.training.grad_sync import PhaseGradSync
from dlightning.training.lr_schedule import apply_learning_rates
from dlightning.training.nonfinite import NonFiniteTracker, all_ranks_finite
from dlightning.training.optim import (
    build_optimizer,
    clip_group_norms,
    drop_inactive_gradients,
    reset_moments,
)
from dlightning.training.rng_state import RankRNG, state_of_rank
from dlightning.training.schedule import PhaseSpec, phase_at
from dlightning.training.step_metrics import StepFacts, StepMetrics, peak_gpu_memory_gb
from dlightning.utils.distributed import gather_from_ranks
from dlightning.utils.logging import get_logger

log = get_logger(__name__)


class DLoRALModule(L.LightningModule):
    """Trains C-LoRA + CFR (consistency phase) and D-LoRA (detail phase); conv_in trains in both.

    Args:
        model, loss, schedule, optim, trainer: The config sections the module consumes.
        config_container: The whole resolved config as plain types, stored in every checkpoint.
        grad_sync: The phase-aware DDP all-reduce state the strategy's communication hook reads (the
            same object given to :func:`~dlightning.training.strategy.build_strategy`); the module
            tells it the parameter groups and each step's phase. None: no phase-aware hook.
    """

    def __init__(self, *, model: ModelConfig, loss: LossConfig, schedule: ScheduleConfig, optim: OptimConfig,
                 trainer: TrainerConfig, config_container: dict | None = None,
                 grad_sync: PhaseGradSync | None = None) -> None:
        super().__init__()
        self.automatic_optimization = False
        # Frozen weights are not in our checkpoints; Lightning must not insist on them when loading.
        self.strict_loading = False
        self.model_cfg, self.loss_cfg, self.schedule_cfg = model, loss, schedule
        self.optim_cfg, self.trainer_cfg = optim, trainer
        self.config_container = config_container or {}
        self.grad_sync = grad_sync
        self.generator = build_generator(model)
        self.loss = DLoRALLoss(loss, self.generator.alphas_cumprod)
        self.rng = RankRNG(trainer.seed)
        """This rank's private generator (CSD draws) and the RNG part of checkpoints."""
        self.step_metrics = StepMetrics(trainer.log_every, optim.accumulate)
        self.ema = PhaseEMA(optim.ema) if optim.ema.enabled else None
        """The phase-aware average of the trainable tensors (``optim.ema``), or None."""
        self.optimizer_step = 0
        """Optimizer steps taken or skipped so far; drives the schedule and is saved in checkpoints."""
        self.micro_step = 0
        """Micro-batches consumed so far (optimizer_step * accumulate + position in the step)."""
        self.at_step_boundary = False
        """True right after the last micro-batch of an optimizer step (read by callbacks)."""
        self.nonfinite = NonFiniteTracker(trainer.max_nonfinite_steps)
        # Sections loaded as a whole config arrive resolved; hand-built ones may still say auto.
        self.mask_mode = resolve_mask_mode(optim.mask_mode, trainer.strategy)
        self._step_poisoned = False
        self._last_phase: str | None = None
        self._active_phase = CONSISTENCY
        """Phase of the optimizer step being taken (read in on_before_optimizer_step)."""
        self._grad_norms: dict[str, float] = {}
        self.last_metrics: dict[str, float] = {}
        """The ``train/...`` metrics of the latest log line (the progress display reads them)."""

    # ----------------------------------------------------------------------------------- set-up
    def configure_optimizers(self) -> torch.optim.Optimizer:
        """One AdamW with a named group per trainable part (see dlightning.training.optim)."""
        return build_optimizer(self.generator.parameter_groups(), self.optim_cfg)

    def on_fit_start(self) -> None:
        """Check the masking suits the strategy; cast the frozen parts to the autocast dtype (trainable
        tensors stay fp32)."""
        if self._deepspeed is not None and self.mask_mode == "drop_grad":
            # ZeRO keeps gradients in its own partitioned buffers: dropping p.grad would change nothing.
            raise RuntimeError("optim.mask_mode=drop_grad cannot hold groups still under DeepSpeed; use "
                               "optim.mask_mode=auto or zero_lr")
        if self.grad_sync is not None:
            self.grad_sync.bind(self.generator.parameter_groups())
        if self.ema is not None:
            self.ema.bind(*self._trainable_by_group())
        # TF32 is a process-wide switch of CUDA's matmul and convolution kernels; every rank sets it.
        torch.set_float32_matmul_precision("high" if self.trainer_cfg.tf32 else "highest")
        torch.backends.cudnn.allow_tf32 = self.trainer_cfg.tf32
        precision = str(self.trainer.precision)
        if "bf16" in precision:
            self.generator.cast_frozen(torch.bfloat16)
        elif "16" in precision:
            self.generator.cast_frozen(torch.float16)

    def on_train_start(self) -> None:
        """Check every rank resumed at the same step (each rank resolves the checkpoint itself; a stale
        directory listing on one node would otherwise split the ranks across phases)."""
        counters = gather_from_ranks((self.optimizer_step, self.micro_step))
        if len(set(counters)) > 1:
            raise RuntimeError(f"ranks start at different (optimizer step, micro-batch) {counters}: they "
                               "resumed from different checkpoints; check the run folder on every node")

    def _trainable_by_group(self) -> tuple[dict[str, torch.nn.Parameter], dict[str, str]]:
        """The trainable parameters by module name, and the optimizer group of each."""
        group_of = {id(p): name for name, ps in self.generator.parameter_groups().items() for p in ps}
        named = {k: p for k, p in self.named_parameters() if id(p) in group_of}
        return named, {k: group_of[id(p)] for k, p in named.items()}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the tensors training changes (both LoRA families, CFR attention, conv_in)."""
        names = {id(p) for ps in self.generator.parameter_groups().values() for p in ps}
        return {k: v.detach().clone() for k, v in self.named_parameters() if id(v) in names}

    # ----------------------------------------------------------------------------------- step
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """One micro-batch: losses of the current phase, backward, and the step on its last micro-batch."""
        spec = phase_at(self.optimizer_step, self.schedule_cfg)
        accumulate = self.optim_cfg.accumulate
        position = self.micro_step % accumulate
        last = position == accumulate - 1
        opt = self.optimizers()
        if position == 0:
            self._enter_step(spec, _inner_optimizer(opt))

        # The Farneback metric runs on the CPU: only for the micro-batch whose step is logged.
        logged = last and self.step_metrics.due(True, self.optimizer_step + 1)
        losses = self.compute_losses(batch, spec, flow_metric=logged)
        total = losses["loss"]
        if not all_ranks_finite(total.detach(), self.trainer.strategy):
            self._step_poisoned = True
        else:
            with nullcontext() if last else self._no_sync():
                self.manual_backward(total / accumulate)

        self.micro_step += 1
        self._sync_data_position(batch)
        self.at_step_boundary = last
        if last:
            self._finish_step(opt, spec)
        self._log_step(losses, spec, batch)

    def _sync_data_position(self, batch: dict[str, Any]) -> None:
        """Check the batch came from the expected micro-batch and tell the data module where we are."""
        served = batch.get("micro_batch")
        if served is not None and int(served) != self.micro_step - 1:
            raise RuntimeError(f"data stream out of step: got micro-batch {int(served)}, expected "
                               f"{self.micro_step - 1}; the data module and the checkpoint disagree")
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "set_position"):
            datamodule.set_position(self.micro_step)

    def _enter_step(self, spec: PhaseSpec, optimizer: torch.optim.Optimizer) -> None:
        if self.grad_sync is not None:
            self.grad_sync.set_phase(spec.phase)  # before this step's backward passes
        apply_learning_rates(optimizer, self.optimizer_step, spec.phase, self.optim_cfg,
                             max_steps=self.trainer_cfg.max_steps, zero_inactive=self.mask_mode == "zero_lr")
        if self._last_phase is not None and spec.phase != self._last_phase:
            log.info("step %d: entering the %s phase", self.optimizer_step, spec.phase)
            if self.optim_cfg.reset_moments_on_phase_entry:
                # only the groups that were frozen: conv_in trains in both phases, its moments are not stale
                entering = set(ACTIVE_GROUPS[spec.phase]) - set(ACTIVE_GROUPS[self._last_phase])
                reset_moments(optimizer, entering)
        self._last_phase = spec.phase
        self._step_poisoned = False

    def _finish_step(self, opt: Any, spec: PhaseSpec) -> None:
        if self._step_poisoned:
            opt.zero_grad(set_to_none=True)
            self._grad_norms = {}
            self.nonfinite.update(False, step=self.optimizer_step)  # raises after max_nonfinite_steps in a row
            log.warning("step %d: non-finite loss on some rank; every rank skips this step", self.optimizer_step)
        else:
            self.nonfinite.update(True, step=self.optimizer_step)
            self._active_phase = spec.phase
            opt.step()
            opt.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.update(self.optimizer_step, spec.phase)
            if self._deepspeed is not None:
                norm = self._deepspeed.get_global_grad_norm()
                self._grad_norms = {"global": float(norm)} if norm is not None else {}
        self.optimizer_step += 1
        if self.optimizer_step >= self.trainer_cfg.max_steps:
            self.trainer.should_stop = True

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Drop the inactive groups' gradients and clip each group (after fp16 unscaling).

        Under DeepSpeed the engine clips one global norm inside its step (gradients are partitioned).
        """
        if self._deepspeed is not None:
            return
        if self.mask_mode == "drop_grad":
            drop_inactive_gradients(optimizer, self._active_phase)
        self._grad_norms = clip_group_norms(optimizer, self.optim_cfg.clip_norm)

    @property
    def _deepspeed(self) -> Any:
        """The DeepSpeed engine when training under DeepSpeed, else None."""
        trainer = self._trainer
        return getattr(trainer.strategy, "deepspeed_engine", None) if trainer is not None else None

    def _no_sync(self):
        """DDP gradient sync is deferred to the last micro-batch of an optimizer step."""
        model = self.trainer.strategy.model
        no_sync = getattr(model, "no_sync", None)
        return no_sync() if callable(no_sync) else nullcontext()

    # ----------------------------------------------------------------------------------- losses
    def compute_losses(self, batch: dict[str, Any], spec: PhaseSpec, *, flow_metric: bool = False,
                       ) -> dict[str, torch.Tensor]:
        """The loss terms of one micro-batch: ``loss_<term>`` (detached) and ``loss``, their weighted sum.

        Args:
            batch: ``lq``, ``hr`` clips ``(B, T, 3, ., .)`` and their ``caption``.
            spec: The schedule at this step (phase and loss weights).
            flow_metric: Add ``metric_farneback`` (CPU work; only for logged micro-batches).
        """
        lq, hr = batch["lq"], batch["hr"]
        targets = list(range(1, hr.shape[1]))
        embeds = self.generator.encode_prompts(list(batch["caption"]))
        # CFR does not train in the detail phase: skip its attention backward there.
        out = self.generator(lq, embeds, targets=targets, cfr_grad="cfr" in ACTIVE_GROUPS[spec.phase])
        pred, gt = out.images, hr[:, 1:]
        # CSD distils the teacher's detail into D-LoRA: only the detail phase evaluates it.
        csd = self._csd_inputs(out.latents, embeds) if spec.phase == DETAIL else None
        terms = self.loss(pred, gt, weights=spec.weights, csd=csd)
        result = {f"loss_{k}": v.detach() for k, v in terms.items()}
        result["loss"] = weighted_total(terms, spec.weights)
        metric = self.loss.flow_metric(pred, gt) if flow_metric else None
        if metric is not None:
            result["metric_farneback"] = metric
        return result

    def _csd_inputs(self, latents: torch.Tensor, embeds: torch.Tensor) -> CSDInputs:
        """The CSD teacher (the frozen base UNet) with this rank's private generator for its draws."""
        generator = self.generator

        def teacher(z_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
            with generator.teacher() as unet:
                return unet(z_t.to(unet.dtype), t, encoder_hidden_states=text.to(unet.dtype)).sample

        return CSDInputs(latents=latents, teacher=teacher, embeds=embeds, encode_prompts=generator.encode_prompts,
                         rng=self.rng.generator(self.device, self.global_rank))

    # ----------------------------------------------------------------------------------- logging
    def _log_step(self, losses: dict[str, torch.Tensor], spec: PhaseSpec, batch: dict[str, Any]) -> None:
        self.step_metrics.add(losses)
        if not self.step_metrics.due(self.at_step_boundary, self.optimizer_step):
            return
        metrics = self.step_metrics.collect(self._step_facts(spec, batch))
        self.last_metrics = metrics
        # Into Lightning's callback metrics too, so ModelCheckpoint(monitor=...) and EarlyStopping see
        # them; the loggers get them below, keyed by our optimizer step instead of Lightning's counter.
        self.log_dict(metrics, logger=False, on_step=True, on_epoch=False, batch_size=batch["hr"].shape[0])
        if self.trainer.is_global_zero:
            # Straight to the loggers, keyed by our optimizer step (Lightning's global_step would count
            # micro-batches differently under accumulation and skipped steps).
            for logger in self.loggers:
                logger.log_metrics(metrics, step=self.optimizer_step)

    def _step_facts(self, spec: PhaseSpec, batch: dict[str, Any]) -> StepFacts:
        datamodule = getattr(self.trainer, "datamodule", None)
        counts = getattr(datamodule, "skip_counts", None)
        groups = _inner_optimizer(self.optimizers()).param_groups
        return StepFacts(
            phase=spec.phase, weights=spec.weights, optimizer_step=self.optimizer_step,
            skipped_steps=self.nonfinite.skipped_total, skipped_samples=counts() if callable(counts) else None,
            clips_per_micro_batch=batch["hr"].shape[0], world_size=self.trainer.world_size,
            grad_norms=self._grad_norms, learning_rates={g["name"]: g["lr"] for g in groups},
            gpu_mem_gb=peak_gpu_memory_gb(self.device),
        )

    # ----------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only the trainable tensors and add counters, every rank's RNG states and the config.

        Runs on every rank (Lightning dumps the checkpoint everywhere, rank 0 writes it), so the RNG
        states of all ranks are gathered here: each rank draws its own CSD noise and timesteps, and a
        resumed run must continue every rank's stream, not rank 0's.
        """
        keep = set(self.trainable_state_dict())
        if "state_dict" in checkpoint:
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        mine = self.rng.state(self.trainer.strategy.root_device, self.device, self.global_rank)
        checkpoint[BLOCK_KEY] = {
            "optimizer_step": self.optimizer_step,
            "micro_step": self.micro_step,
            "last_phase": self._last_phase,
            "nonfinite": self.nonfinite.state_dict(),
            **mine,  # rank 0's, kept at the top level for readers of older checkpoints
            "rng_per_rank": gather_from_ranks(mine),
            "config": self.config_container,
        }
        if self.ema is not None:
            checkpoint[BLOCK_KEY]["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check every trainable tensor is present and restore counters and RNG states.

        DeepSpeed restores the weights itself and hands over a checkpoint without ``state_dict``.
        """
        stored = checkpoint.get("state_dict")
        missing = set(self.trainable_state_dict()) - set(stored) if stored is not None else set()
        if missing:
            raise RuntimeError(f"checkpoint lacks {len(missing)} trainable tensors, e.g. {sorted(missing)[:3]}")
        state = checkpoint[BLOCK_KEY]
        self.optimizer_step = int(state["optimizer_step"])
        self.micro_step = int(state["micro_step"])
        self._last_phase = state["last_phase"]
        self.nonfinite.load_state_dict(state["nonfinite"])
        mine = state_of_rank(state, self.global_rank, self.trainer.world_size)
        # the strategy's device: under DDP this hook runs before the module is moved to its GPU
        self.rng.load(mine, self.trainer.strategy.root_device)
        if self.ema is not None and "ema" in state:
            self.ema.load_state_dict(state["ema"])
        elif self.ema is not None:
            log.info("the checkpoint has no EMA (optim.ema was off): the average starts at the resumed weights")


def _inner_optimizer(opt: Any) -> torch.optim.Optimizer:
    """The torch optimizer behind Lightning's wrapper (its ``param_groups`` carry our group names)."""
    return opt.optimizer if hasattr(opt, "optimizer") else opt
