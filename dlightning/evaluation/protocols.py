"""Named evaluation protocols of the common video super-resolution benchmarks.

A protocol fixes what the papers' tables fix: which metrics, the border crop, how many frames of each
clip, the colour space of PSNR / SSIM (``psnr`` = RGB, ``psnr_y`` = BT.601 Y) and the colour fix of the
upscaling. ``evaluate.protocol=<name>`` applies one; any ``evaluate.*`` key given explicitly wins over it.
The choices and where they come from are in docs/EVALUATION.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from dlightning.errors import ConfigError

_NO_REFERENCE = ("musiq", "clipiqa", "niqe", "brisque")
_REFERENCE = ("lpips", "dists", "ewarp_raft")


@dataclass(frozen=True)
class Protocol:
    """Settings one benchmark's tables are computed with."""

    name: str
    metrics: tuple[str, ...]
    needs_gt: bool
    crop_border: int = 0
    max_frames: int = 0
    """Frames per clip from the start (0 = all)."""
    color_fix: str = "adain"
    description: str = ""


PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (
    Protocol("videolq", _NO_REFERENCE + ("ewarp_raft",), needs_gt=False,
             description="VideoLQ: 50 real-world clips without GT; no-reference quality and E*warp on the output"),
    Protocol("reds4", ("psnr", "ssim") + _REFERENCE + _NO_REFERENCE, needs_gt=True,
             description="REDS4 (clips 000, 011, 015, 020 of REDS val/train, 100 frames each): PSNR/SSIM on RGB"),
    Protocol("udm10", ("psnr_y", "ssim_y") + _REFERENCE + _NO_REFERENCE, needs_gt=True,
             description="UDM10: 10 clips of 32 frames; PSNR/SSIM on Y"),
    Protocol("spmcs", ("psnr_y", "ssim_y") + _REFERENCE + _NO_REFERENCE, needs_gt=True,
             description="SPMCS: 30 clips of 31 frames; PSNR/SSIM on Y"),
    Protocol("youhq40", ("psnr", "ssim") + _REFERENCE + _NO_REFERENCE, needs_gt=True,
             description="YouHQ40 (Upscale-A-Video's synthetic test set): PSNR/SSIM on RGB"),
)}


def get_protocol(name: str) -> Protocol:
    """The protocol called ``name`` (case-insensitive).

    Raises:
        ConfigError: No such protocol (the message lists them).
    """
    key = name.lower()
    if key not in PROTOCOLS:
        raise ConfigError(f"evaluate.protocol={name!r} is not a known protocol; choose one of {sorted(PROTOCOLS)}")
    return PROTOCOLS[key]
