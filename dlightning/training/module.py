"""The LightningModule: manual optimisation of the generator in two alternating phases.

The module only orchestrates. The generator, the losses, the phase schedule and the optimizer
layout live in their own modules. Per micro-batch it reads the phase and the loss weights from the
schedule (a pure function of its own optimizer-step counter), runs the generator on the windows
(t-1, t) of the clip, sums the weighted losses, back-propagates (without DDP gradient sync on
accumulation steps) and, on the last micro-batch of a step, drops the inactive groups' gradients,
clips each active group and steps. A non-finite loss on any rank makes every rank skip the step.
"""

from __future__ import annotations

import random
import time
from contextlib import nullcontext
from typing import Any

import lightning as L
import numpy as np
import torch

from dlightning.losses import (
    CSDLoss,
    build_lpips,
    build_temporal_loss,
    farneback_flow_metric,
    mse_loss,
    sample_clip_noise,
)
from dlightning.losses.config import LossConfig
from dlightning.models.config import ModelConfig
from dlightning.models.generator import build_generator
from dlightning.training.config import OptimConfig, ScheduleConfig, TrainerConfig
from dlightning.training.grad_sync import PhaseGradSync
from dlightning.training.nonfinite import NonFiniteTracker, all_ranks_finite
from dlightning.training.optim import (
    ACTIVE_GROUPS,
    build_optimizer,
    clip_group_norms,
    drop_inactive_gradients,
    reset_moments,
    set_phase_learning_rates,
)
from dlightning.training.schedule import PhaseSpec, phase_at
from dlightning.utils.logging import get_logger

log = get_logger(__name__)

CKPT_KEY = "dlightning"


class DLoRALModule(L.LightningModule):
    """Trains C-LoRA + CFR (consistency phase) and D-LoRA (detail phase); conv_in trains in both."""

    def __init__(self, *, model: ModelConfig, loss: LossConfig, schedule: ScheduleConfig, optim: OptimConfig,
                 trainer: TrainerConfig, config_container: dict | None = None) -> None:
        super().__init__()
        self.automatic_optimization = False
        # Frozen weights are not in our checkpoints; Lightning must not insist on them when loading.
        self.strict_loading = False
        self.model_cfg, self.loss_cfg, self.schedule_cfg = model, loss, schedule
        self.optim_cfg, self.trainer_cfg = optim, trainer
        self.config_container = config_container or {}
        self.generator = build_generator(model)
        self.lpips = build_lpips(loss.lpips)
        self.csd = CSDLoss(loss.csd, self.generator.alphas_cumprod)
        self.temporal = build_temporal_loss(loss.temporal)
        self.optimizer_step = 0
        """Optimizer steps taken or skipped so far; drives the schedule and is saved in checkpoints."""
        self.micro_step = 0
        """Micro-batches consumed so far (optimizer_step * accumulate + position in the step)."""
        self.at_step_boundary = False
        """True right after the last micro-batch of an optimizer step (read by callbacks)."""
        self.nonfinite = NonFiniteTracker(trainer.max_nonfinite_steps)
        self.mask_mode = optim.mask_mode if optim.mask_mode != "auto" else (
            "zero_lr" if trainer.strategy.startswith("deepspeed") else "drop_grad")
        self._step_poisoned = False
        self._last_phase: str | None = None
        self._active_phase = "consistency"
        """Phase of the optimizer step being taken (read in on_before_optimizer_step)."""
        self._grad_norms: dict[str, float] = {}
        self._t_last = time.perf_counter()
        self._generator: torch.Generator | None = None
        self._with_metrics = False
        self._loss_window: dict[str, tuple[float, int]] = {}
        """Sum and count per loss term since the last log line."""
        self._pending_rng: torch.Tensor | None = None

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
        sync = self._grad_sync
        if sync is not None:
            sync.bind(self.generator.parameter_groups())
        precision = str(self.trainer.precision)
        if "bf16" in precision:
            self.generator.cast_frozen(torch.bfloat16)
        elif "16" in precision:
            self.generator.cast_frozen(torch.float16)

    def on_train_start(self) -> None:
        """Check every rank resumed at the same step (each rank resolves the checkpoint itself; a stale
        directory listing on one node would otherwise split the ranks across phases)."""
        counters = _gather_from_ranks((self.optimizer_step, self.micro_step))
        if len(set(counters)) > 1:
            raise RuntimeError(f"ranks start at different (optimizer step, micro-batch) {counters}: they "
                               "resumed from different checkpoints; check the run folder on every node")

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
            self._enter_step(spec, opt.optimizer if hasattr(opt, "optimizer") else opt)

        # The Farneback metric runs on the CPU: only for the micro-batch whose step is logged.
        self._with_metrics = last and (self.optimizer_step + 1) % max(self.trainer_cfg.log_every, 1) == 0
        losses = self.compute_losses(batch, spec)
        total = losses["loss"]
        finite = all_ranks_finite(total.detach(), self.trainer.strategy)
        if not finite:
            self._step_poisoned = True
        else:
            sync = nullcontext() if last else self._no_sync()
            with sync:
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
        sync = self._grad_sync
        if sync is not None:
            sync.set_phase(spec.phase)  # before this step's backward passes
        if self.mask_mode == "zero_lr":
            set_phase_learning_rates(optimizer, spec.phase, self.optim_cfg.lr)
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
    def _grad_sync(self) -> PhaseGradSync | None:
        """The phase-aware DDP all-reduce state when the strategy uses it, else None."""
        trainer = self._trainer
        state = getattr(trainer.strategy, "_ddp_comm_state", None) if trainer is not None else None
        return state if isinstance(state, PhaseGradSync) else None

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
    def compute_losses(self, batch: dict[str, Any], spec: PhaseSpec) -> dict[str, torch.Tensor]:
        """Weighted loss terms for one micro-batch; ``loss`` is their sum."""
        lq, hr = batch["lq"], batch["hr"]
        frames = hr.shape[1]
        targets = list(range(1, frames))
        embeds = self.generator.encode_prompts(list(batch["caption"]))
        # CFR does not train in the detail phase: skip its attention backward there.
        out = self.generator(lq, embeds, targets=targets, cfr_grad="cfr" in ACTIVE_GROUPS[spec.phase])
        pred, gt = out.images, hr[:, 1:]
        w = spec.weights
        terms: dict[str, torch.Tensor] = {}
        terms["l2"] = sum(mse_loss(pred[:, k], gt[:, k]) for k in range(len(targets)))
        terms["lpips"] = sum(self.lpips(pred[:, k].float(), gt[:, k].float()) for k in range(len(targets)))
        zero = pred.new_zeros((), dtype=torch.float32)
        terms["csd"] = self._csd(out.latents, embeds) if spec.phase == "detail" and w.get("csd", 0) > 0 else zero
        terms["temporal"] = self._temporal(pred, gt) if self.temporal is not None and w.get("temporal", 0) > 0 \
            else zero
        total = sum(float(w.get(k, 0.0)) * v.float() for k, v in terms.items())
        result = {f"loss_{k}": v.detach() for k, v in terms.items()}
        result["loss"] = total
        if self._with_metrics and self.loss_cfg.temporal.log_farneback and pred.shape[1] >= 2:
            result["metric_farneback"] = torch.tensor(
                farneback_flow_metric(pred[:, 0].detach(), pred[:, 1].detach(), gt[:, 0], gt[:, 1]))
        return result

    def _csd(self, latents: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        neg = self.generator.encode_prompts([self.loss_cfg.csd.negative_prompt])
        generator = self.generator

        def teacher(z_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
            with generator.teacher() as unet:
                return unet(z_t.to(unet.dtype), t, encoder_hidden_states=text.to(unet.dtype)).sample

        rng = self._rng()
        noise = sample_clip_noise(latents, shared=self.loss_cfg.csd.shared_noise, generator=rng)
        total = latents.new_zeros((), dtype=torch.float32)
        for k in range(latents.shape[1]):
            loss, _ = self.csd(latents[:, k], teacher, embeds, neg, noise=noise[:, k], generator=rng)
            total = total + loss
        return total

    def _rng(self) -> torch.Generator:
        """The module's private RNG (CSD timesteps and noise); its state is saved in checkpoints so a
        resumed run draws exactly what an uninterrupted run would."""
        if self._generator is None or self._generator.device != self.device:
            self._generator = torch.Generator(device=self.device)
            self._generator.manual_seed(self.trainer_cfg.seed * 1000 + self.global_rank)
            if self._pending_rng is not None:
                self._generator.set_state(self._pending_rng.to("cpu"))
                self._pending_rng = None
        return self._generator

    def _temporal(self, pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        total = pred.new_zeros((), dtype=torch.float32)
        for k in range(1, pred.shape[1]):
            total = total + self.temporal(pred[:, k - 1], pred[:, k], gt[:, k - 1], gt[:, k])
        return total

    # ----------------------------------------------------------------------------------- logging
    def _log_step(self, losses: dict[str, torch.Tensor], spec: PhaseSpec, batch: dict[str, Any]) -> None:
        # Loss terms are averaged over every micro-batch since the last log line (a single micro-batch
        # of a few clips is too noisy to show a trend).
        for k, v in losses.items():
            if v.numel() == 1 and torch.isfinite(v).all():
                total, count = self._loss_window.get(k, (0.0, 0))
                self._loss_window[k] = (total + float(v.detach()), count + 1)
        if not self.at_step_boundary or self.optimizer_step % max(self.trainer_cfg.log_every, 1):
            return
        now = time.perf_counter()
        steps = max(self.trainer_cfg.log_every, 1)
        clips = batch["hr"].shape[0] * self.optim_cfg.accumulate * steps * self.trainer.world_size
        metrics = {f"train/{k}": total / count for k, (total, count) in self._loss_window.items()}
        self._loss_window = {}
        metrics.update({f"train/weight_{k}": float(v) for k, v in spec.weights.items()})
        metrics["train/phase"] = 0.0 if spec.phase == "consistency" else 1.0
        metrics["train/optimizer_step"] = float(self.optimizer_step)
        metrics["train/skipped_steps"] = float(self.nonfinite.skipped_total)
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "skip_counts"):
            skipped = datamodule.skip_counts()
            metrics["train/skipped_samples"] = float(sum(skipped.values()))
            metrics.update({f"train/skipped_samples_{reason}": float(n) for reason, n in skipped.items()})
        metrics["train/clips_per_s"] = clips / max(now - self._t_last, 1e-9)
        metrics["train/clips_per_s_per_device"] = metrics["train/clips_per_s"] / self.trainer.world_size
        for name, norm in self._grad_norms.items():
            metrics[f"train/grad_norm_{name}"] = norm
        opt = self.optimizers()
        for group in (opt.optimizer if hasattr(opt, "optimizer") else opt).param_groups:
            metrics[f"train/lr_{group['name']}"] = group["lr"]
        if torch.cuda.is_available() and self.device.type == "cuda":
            metrics["train/gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self._t_last = now
        if self.trainer.is_global_zero:
            # Straight to the loggers, keyed by our optimizer step (Lightning's global_step would count
            # micro-batches differently under accumulation and skipped steps).
            for logger in self.loggers:
                logger.log_metrics(metrics, step=self.optimizer_step)

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
        mine = {"rng": _rng_state(self.trainer.strategy.root_device), "module_rng": self._rng().get_state()}
        checkpoint[CKPT_KEY] = {
            "optimizer_step": self.optimizer_step,
            "micro_step": self.micro_step,
            "last_phase": self._last_phase,
            "nonfinite": self.nonfinite.state_dict(),
            **mine,  # rank 0's, kept at the top level for readers of older checkpoints
            "rng_per_rank": _gather_from_ranks(mine),
            "config": self.config_container,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check every trainable tensor is present and restore counters and RNG states.

        DeepSpeed restores the weights itself and hands over a checkpoint without ``state_dict``.
        """
        stored = checkpoint.get("state_dict")
        missing = set(self.trainable_state_dict()) - set(stored) if stored is not None else set()
        if missing:
            raise RuntimeError(f"checkpoint lacks {len(missing)} trainable tensors, e.g. {sorted(missing)[:3]}")
        state = checkpoint[CKPT_KEY]
        self.optimizer_step = int(state["optimizer_step"])
        self.micro_step = int(state["micro_step"])
        self._last_phase = state["last_phase"]
        self.nonfinite.load_state_dict(state["nonfinite"])
        per_rank = state.get("rng_per_rank") or []
        if len(per_rank) == self.trainer.world_size:
            mine = per_rank[self.global_rank]
        else:
            mine = state
            if self.trainer.world_size > 1:
                log.warning("checkpoint holds RNG states of %d ranks, this run has %d: every rank continues "
                            "rank 0's random stream", len(per_rank), self.trainer.world_size)
        # the strategy's device: under DDP this hook runs before the module is moved to its GPU
        _set_rng_state(mine["rng"], self.trainer.strategy.root_device)
        self._generator = None
        self._pending_rng = mine["module_rng"]


def _gather_from_ranks(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]``; a one-element list outside a process group."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state_plain(),
        "python": _python_state_plain(),
    }
    if device.type == "cuda":
        # this rank's GPU only: get_rng_state_all() would open a context on every visible GPU
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _numpy_state_plain() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _python_state_plain() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
