"""Third-party noise of saving and loading model folders, silenced where dlightning causes it.

Each item is output a user cannot act on, caused by a library call this package makes:

* transformers' ``Loading weights`` / ``Writing model shards`` progress bars (``from_pretrained`` /
  ``save_pretrained`` of the text encoder): a bar for a sub-second step of a command that reports its own
  progress;
* DeepSpeed's ``Setting accelerator to CPU. If you have GPU ... we were unable to detect it``: transformers'
  ``save_pretrained`` imports DeepSpeed (through accelerate) only to test whether the model is wrapped, and
  DeepSpeed's accelerator probe warns on every machine without CUDA. Naming the accelerator it would pick
  anyway (``DS_ACCELERATOR=cpu`` when CUDA is absent) skips the probe and its warning;
* diffusers' ``There are modules in ... that should be kept in float32: []`` from ``ModelMixin.to(dtype)``:
  it warns whatever the list holds (here: nothing), so :func:`cast` casts through ``nn.Module.to``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def quiet_model_io() -> Iterator[None]:
    """Within the block: no transformers progress bars, no DeepSpeed accelerator probe on a CPU-only machine.

    The previous progress-bar setting and ``DS_ACCELERATOR`` are restored afterwards.
    """
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    set_ds = "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available()
    hf_logging.disable_progress_bar()
    if set_ds:
        os.environ["DS_ACCELERATOR"] = "cpu"
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()
        if set_ds:
            os.environ.pop("DS_ACCELERATOR", None)


def cast(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``module`` with its floating-point tensors in ``dtype`` (in place), without diffusers' empty warning."""
    return nn.Module.to(module, dtype=dtype)
