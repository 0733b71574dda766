"""DeepSpeed ZeRO-2 for this training: Lightning's strategy with the four changes our step needs.

Lightning's ``DeepSpeedStrategy`` used as is fails or silently differs from our DDP training in four
places, each found by running it (``tests/integration/test_deepspeed.py``):

1. **Micro-batch size.** Lightning reads it from ``train_dataloader.batch_sampler.batch_size``; our
   WebDataset loader batches inside the pipeline (no batch sampler), so ``fit`` crashes with
   ``AttributeError``. We pass ``data.batch_size`` (DeepSpeed only uses it for throughput logging).
2. **Mixed precision.** ``precision=bf16-mixed`` switches on DeepSpeed's own bf16 mode, which casts the
   whole LightningModule (trainable LoRAs, LPIPS, VAE) to bf16, and Lightning's DeepSpeed precision
   plugin casts every batch to bf16. The losses then fail (fp32 inputs into bf16 LPIPS) or lose
   precision. Instead the step runs under ``torch.autocast`` exactly like DDP's ``bf16-mixed``:
   trainable tensors, gradients, Adam state and the batch stay fp32 (:class:`AutocastDeepSpeedPrecision`
   leaves the batch alone), the module casts its frozen parts to bf16 itself, and DeepSpeed's bf16 and
   fp16 sections are off. The autocast must be DeepSpeed's own ``torch_autocast`` section: the engine's
   forward (inside which Lightning runs ``training_step``) *disables* an autocast entered outside it
   when that section is off (``deepspeed.runtime.torch_autocast.autocast_if_enabled``; on CUDA only,
   since it asks ``torch.is_autocast_enabled()``, which checks CUDA). ``lower_precision_safe_modules``
   is empty so gradients are reduced in fp32, as under DDP. ``16-mixed`` is refused (fp16 autocast
   needs a loss scaler, which DeepSpeed's engine does not apply to autocast under ZeRO).
3. **Gradient clipping.** Under ZeRO-2 gradients live in DeepSpeed's partitioned flat buffers
   (``p.grad`` is None), so per-group clipping is impossible; DeepSpeed clips one global norm over
   all trainable tensors (``gradient_clipping``). :func:`dlightning.training.config.global_clip_norm`
   maps ``optim.clip_norm`` onto it and refuses per-group limits that differ. Note the global norm
   includes the gradients of the groups held still by ``zero_lr`` masking.
4. **CPU.** Lightning refuses any accelerator but CUDA; DeepSpeed itself runs on CPU (its CPU
   accelerator, gloo). We allow ``trainer.accelerator=cpu`` so the DeepSpeed path runs with real
   processes in CI; it is for tests and debugging, not speed.
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.plugins.precision import DeepSpeedPrecision
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

from dlightning.errors import ConfigError
from dlightning.training.config import check_deepspeed_precision


class AutocastDeepSpeedPrecision(DeepSpeedPrecision):
    """DeepSpeed precision plugin that keeps the batch fp32 and runs each step under ``torch.autocast``
    (inside the engine's forward DeepSpeed's ``torch_autocast`` section, set to the same, takes over).

    Args:
        precision: ``bf16-mixed`` or ``32-true``.
        device_type: the autocast device type, ``cuda`` or ``cpu``.
    """

    def __init__(self, precision: str, device_type: str) -> None:
        check_deepspeed_precision(precision)
        super().__init__("32-true" if precision == "32" else precision)  # type: ignore[arg-type]
        self.device_type = device_type

    def convert_input(self, data: Any) -> Any:
        """Leave the batch as the loader made it (fp32 images; autocast picks op dtypes)."""
        return data

    def forward_context(self) -> AbstractContextManager:
        """``torch.autocast`` in bf16 for ``bf16-mixed``, nothing for ``32-true``."""
        if self.precision == "bf16-mixed":
            return torch.autocast(self.device_type, dtype=torch.bfloat16)
        return nullcontext()


class DLoRALDeepSpeedStrategy(DeepSpeedStrategy):
    """ZeRO stage 2 with the micro-batch size, clipping and precision set for DLoRAL training.

    Args:
        batch_size: clips per micro-batch per process (``data.batch_size``).
        clip_norm: global gradient-norm limit (0 = none), see :func:`dlightning.training.config.global_clip_norm`.
        precision: ``bf16-mixed`` or ``32-true``.
        device_type: ``cuda`` or ``cpu``.
    """

    def __init__(self, *, batch_size: int, clip_norm: float, precision: str, device_type: str) -> None:
        super().__init__(
            stage=2,
            exclude_frozen_parameters=True,
            logging_batch_size_per_gpu=batch_size,
            precision_plugin=AutocastDeepSpeedPrecision(precision, device_type),
        )
        assert isinstance(self.config, dict)
        self.config["gradient_clipping"] = float(clip_norm)
        # Present and off, so Lightning does not switch on DeepSpeed's whole-module casting.
        self.config["bf16"] = {"enabled": False}
        self.config["fp16"] = {"enabled": False}
        if precision == "bf16-mixed":
            self.config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16",
                                             "lower_precision_safe_modules": []}

    @property
    def on_cpu(self) -> bool:
        """Whether this run uses DeepSpeed's CPU accelerator (tests, debugging)."""
        return not isinstance(self.accelerator, CUDAAccelerator)

    def setup_environment(self) -> None:
        if not self.on_cpu:
            super().setup_environment()
            return
        # Lightning's DeepSpeedStrategy raises for any accelerator but CUDA; DeepSpeed itself runs on CPU.
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        if not self.on_cpu:
            super().setup_distributed()
            return
        # CPU devices carry no index, which Lightning's device-index check expects.
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model: torch.nn.Module, optimizer: Any, lr_scheduler: Any = None,
                                   ) -> tuple[Any, Any]:
        if not self.on_cpu:
            return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)
        import deepspeed

        # DeepSpeed treats a missing device index (a CPU device) as "not distributed"; give it the rank.
        engine, deepspeed_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank),
            config=self.config,
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, deepspeed_optimizer


def select_deepspeed_accelerator(accelerator: str) -> None:
    """Make DeepSpeed use its CPU accelerator for a CPU run (it picks CUDA whenever a GPU is visible).

    Must run before ``deepspeed`` is imported; child processes inherit the choice.

    Raises:
        ConfigError: deepspeed was already imported with another accelerator.
    """
    if accelerator != "cpu":
        inherited = os.environ.get("DS_ACCELERATOR")
        if inherited not in (None, "", "cuda"):
            raise ConfigError(f"a CUDA run, but DS_ACCELERATOR={inherited!r} in the environment; unset it")
        return
    chosen = os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if chosen != "cpu":
        raise ConfigError(f"trainer.accelerator=cpu but DS_ACCELERATOR={chosen!r}; unset DS_ACCELERATOR")
    if "deepspeed" in sys.modules:
        from deepspeed.accelerator import get_accelerator

        name = get_accelerator().device_name()
        if name != "cpu":
            raise ConfigError(f"deepspeed was imported with its {name!r} accelerator before a CPU run was "
                              "configured; set DS_ACCELERATOR=cpu in the environment")
