"""An exponential moving average (EMA) of the trainable tensors, aware of the training phases.

Written here rather than with Lightning's ``EMAWeightAveraging``: that callback averages a deep copy
of the whole LightningModule (the frozen SD 2.1 UNet, VAE and text encoder included, several GB) and
updates every parameter at every step, whereas a frozen family must keep its average while the other
phase trains. This one keeps an fp32 shadow of the trainable tensors only (LoRA families, CFR,
conv_in), updates it after each optimizer step that was taken (not after a skipped non-finite one),
and only for the groups that stepped in that phase. Its state goes into the checkpoint's block so a
resumed run continues it exactly; export and validation can use it instead of the raw weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from dlightning.contracts.phases import ACTIVE_GROUPS
from dlightning.training.config import EMAConfig


class PhaseEMA:
    """The shadow tensors, keyed by the LightningModule's parameter names.

    Args:
        cfg: ``optim.ema``.
    """

    def __init__(self, cfg: EMAConfig) -> None:
        self.cfg = cfg
        self.shadow: dict[str, torch.Tensor] = {}
        self._params: dict[str, nn.Parameter] = {}
        self._group_of: dict[str, str] = {}
        self._pending: dict[str, torch.Tensor] | None = None

    def bind(self, named: dict[str, nn.Parameter], group_of: dict[str, str]) -> None:
        """Track ``named`` trainable parameters (``group_of`` names each one's optimizer group); a restored
        state waiting from :meth:`load_state_dict` is applied now, else the average starts at the weights."""
        self._params, self._group_of = named, group_of
        source = self._pending if self._pending is not None else {k: p.detach() for k, p in named.items()}
        missing = sorted(set(named) - set(source))
        if missing:
            raise RuntimeError(f"the checkpoint's EMA lacks {len(missing)} tensors, e.g. {missing[:3]}")
        self.shadow = {k: source[k].detach().to(device=p.device, dtype=torch.float32).clone()
                       for k, p in named.items()}
        self._pending = None

    @torch.no_grad()
    def update(self, step: int, phase: str) -> None:
        """Fold the weights after optimizer step ``step`` into the average of the groups active in ``phase``."""
        active = ACTIVE_GROUPS[phase]
        weight = 1.0 if step < self.cfg.start_step else 1.0 - self.cfg.decay
        for name, param in self._params.items():
            if self._group_of[name] in active:
                self.shadow[name].lerp_(param.detach().float(), weight)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The shadow tensors on the CPU (plain tensors: ``torch.load(weights_only=True)`` reads them)."""
        return {k: v.detach().cpu().clone() for k, v in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the shadow; applied by :meth:`bind` (checkpoints load before the parameters are bound)."""
        self._pending = dict(state)
        if self._params:
            self.bind(self._params, self._group_of)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Run the block with the averaged weights in the parameters; the raw weights come back after."""
        raw = {k: p.detach().clone() for k, p in self._params.items()}
        try:
            with torch.no_grad():
                for k, p in self._params.items():
                    p.copy_(self.shadow[k].to(p.dtype))
            yield
        finally:
            with torch.no_grad():
                for k, p in self._params.items():
                    p.copy_(raw[k])
