"""Per-clip transforms of the training loader: decode, aligned crop, dihedral augmentation, tensors.

Everything random takes an explicit ``numpy.random.Generator`` so that a batch is a pure function of
its seeds (see ``derive_seed``), whichever worker process builds it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


class SampleError(Exception):
    """A sample cannot be used; ``reason`` is the skip-counter key (e.g. ``decode_error``)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def derive_seed(*values: int) -> int:
    """Mix non-negative integers into one 32-bit seed (stable across processes and PYTHONHASHSEED).

    Args:
        *values: Seed components, e.g. (data seed, resume count, rank, micro-batch, purpose tag).

    Returns:
        An int in [0, 2**32).
    """
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1, dtype=np.uint32)[0])


def stack_frames(frames: list[np.ndarray], what: str) -> np.ndarray:
    """Stack equally sized frames to (T, H, W, 3); frames of different sizes are a ``size_mismatch``."""
    if any(f.shape != frames[0].shape for f in frames):
        raise SampleError("size_mismatch", f"{what} frames differ in size")
    return np.stack(frames)


def check_pair_sizes(hr: np.ndarray, lq: np.ndarray | None, *, scale: int, crop_size: int) -> None:
    """Check that LQ is exactly HR / scale (HR divisible by scale when there is no LQ: online LQ) and
    that HR can hold one crop.

    Raises:
        SampleError: ``size_mismatch`` or ``too_small``.
    """
    h, w = hr.shape[1:3]
    if h % scale or w % scale:
        raise SampleError("size_mismatch", f"hr {h}x{w} is not divisible by scale {scale}")
    if lq is not None and lq.shape[1:3] != (h // scale, w // scale):
        raise SampleError("size_mismatch", f"hr {h}x{w} vs lq {lq.shape[1]}x{lq.shape[2]} at scale {scale}")
    if h < crop_size or w < crop_size:
        raise SampleError("too_small", f"hr {h}x{w} < crop {crop_size}")


def random_window(num_frames: int, frames: int, rng: np.random.Generator) -> int:
    """First index of a random window of ``frames`` consecutive frames in a clip of ``num_frames``."""
    return int(rng.integers(0, num_frames - frames + 1))


def random_aligned_crop(hr: np.ndarray, lq: np.ndarray | None, *, crop_size: int, scale: int,
                        rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """Crop HR (T, H, W, 3) at a position that is a multiple of ``scale`` and LQ at exactly that / scale.

    Returns:
        (HR crop of crop_size, LQ crop of crop_size // scale), both covering the same scene area; the LQ
        crop is None without an LQ clip (online LQ), the HR crop the same as with one.
    """
    h, w = hr.shape[1:3]
    y = scale * int(rng.integers(0, (h - crop_size) // scale + 1))
    x = scale * int(rng.integers(0, (w - crop_size) // scale + 1))
    c, ly, lx = crop_size // scale, y // scale, x // scale
    return hr[:, y:y + crop_size, x:x + crop_size], None if lq is None else lq[:, ly:ly + c, lx:lx + c]


@dataclass(frozen=True)
class Dihedral:
    """One of the 8 square symmetries: optional horizontal flip, vertical flip, then a 90-degree turn."""

    hflip: bool = False
    vflip: bool = False
    rot90: bool = False

    @classmethod
    def draw(cls, rng: np.random.Generator) -> Dihedral:
        """Draw one of the 8 symmetries uniformly."""
        bits = rng.integers(0, 2, size=3)
        return cls(bool(bits[0]), bool(bits[1]), bool(bits[2]))

    def apply(self, frames: np.ndarray) -> np.ndarray:
        """Apply to every frame of (T, H, W, C), so a clip and its LQ twin stay consistent."""
        if self.hflip:
            frames = frames[:, :, ::-1]
        if self.vflip:
            frames = frames[:, ::-1]
        if self.rot90:
            frames = np.rot90(frames, k=1, axes=(1, 2))
        return frames


def to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float32 (T, 3, H, W) in [-1, 1]."""
    chw = np.ascontiguousarray(frames.transpose(0, 3, 1, 2))
    return torch.from_numpy(chw).float().div_(127.5).sub_(1.0)


def collate_clips(clips: list[dict], *, micro_batch: int, skipped: dict[str, int]) -> dict:
    """Stack clip dicts into the batch dict of docs/INTERFACES.md (plus loader bookkeeping).

    Args:
        clips: Dicts with ``hr``/``lq`` tensors (T, 3, H, W) and ``caption``/``key``/``kind`` strings; online
            clips (docs/DATA.md 1.8) have ``degradation`` instead of ``lq``.
        micro_batch: Index of this micro-batch on its rank (lets the module check phase alignment).
        skipped: Samples skipped per reason while this batch was built (popped by the DataModule).

    Returns:
        ``{"hr", "lq", "caption", "key", "kind", "micro_batch", "skipped"}``; an online batch has
        ``degradation`` (one dict per clip) in place of ``lq`` until the device makes it.
    """
    batch = {"hr": torch.stack([c["hr"] for c in clips])}
    if all("lq" in c for c in clips):
        batch["lq"] = torch.stack([c["lq"] for c in clips])
    else:
        batch["degradation"] = [c["degradation"] for c in clips]
    batch.update({
        "caption": [c["caption"] for c in clips],
        "key": [c["key"] for c in clips],
        "kind": [c["kind"] for c in clips],
        "micro_batch": micro_batch,
        "skipped": dict(skipped),
    })
    return batch
