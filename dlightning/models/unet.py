"""UNet surgery: the 8-channel conv_in of DLoRAL and the attention / memory settings.

The generator UNet reads ``[warped previous latent (4 ch), fused current latent (4 ch)]``. Its new
``conv_in`` starts from the pretrained 4-channel kernel copied into both halves (not halved: parity with
the released weights, docs/METHOD.md 2.4). The pristine 4-channel kernel is kept as two non-persistent
buffers (``TEACHER_CONV_IN_WEIGHT`` / ``TEACHER_CONV_IN_BIAS``) so the same frozen UNet can also serve as
the CSD teacher (:func:`dlightning.models.lora.teacher_mode`); non-persistent buffers follow ``.to()`` but
never enter ``state_dict()``, so checkpoints and exports do not carry them.
"""

from __future__ import annotations

import torch
from torch import nn

TEACHER_CONV_IN_WEIGHT = "dl_teacher_conv_in_weight"
TEACHER_CONV_IN_BIAS = "dl_teacher_conv_in_bias"


def expand_conv_in(unet: nn.Module, bias: str = "pretrained", in_channels: int = 8) -> nn.Conv2d:
    """Replace ``unet.conv_in`` by a wider conv whose 4-channel blocks each repeat the pretrained kernel.

    Args:
        unet: A diffusers ``UNet2DConditionModel`` with its original 4-channel ``conv_in``.
        bias: ``pretrained`` copies the pretrained bias; ``random`` keeps PyTorch's default init (the
            reference code's quirk).
        in_channels: New input width, a multiple of the old one (8 for DLoRAL).

    Returns:
        The new conv (also set as ``unet.conv_in``); ``unet.config.in_channels`` is updated.
    """
    if bias not in ("pretrained", "random"):
        raise ValueError(f"bias={bias!r} is not valid; choose 'pretrained' or 'random'")
    old = unet.conv_in
    if not isinstance(old, nn.Conv2d):
        raise TypeError(f"unet.conv_in is a {type(old).__name__}; expand_conv_in must run before LoRA "
                        "injection")
    c_in = old.in_channels
    if in_channels % c_in:
        raise ValueError(f"in_channels={in_channels} is not a multiple of the pretrained {c_in}")
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, stride=old.stride, padding=old.padding,
                    device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        for start in range(0, in_channels, c_in):
            new.weight[:, start:start + c_in].copy_(old.weight)
        if bias == "pretrained":
            new.bias.copy_(old.bias)
    unet.register_buffer(TEACHER_CONV_IN_WEIGHT, old.weight.detach().clone(), persistent=False)
    unet.register_buffer(TEACHER_CONV_IN_BIAS, old.bias.detach().clone(), persistent=False)
    unet.conv_in = new
    unet.register_to_config(in_channels=in_channels)
    return new


def configure_unet(unet: nn.Module, gradient_checkpointing: bool = False) -> None:
    """Use PyTorch SDPA attention everywhere and optionally recompute activations in backward.

    Args:
        unet: A diffusers ``UNet2DConditionModel``.
        gradient_checkpointing: Trade compute for activation memory during training.
    """
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    elif getattr(unet, "is_gradient_checkpointing", False):
        unet.disable_gradient_checkpointing()
