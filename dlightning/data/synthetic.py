"""``data.backend: synthetic``: deterministic in-memory clips for smoke tests and resume tests.

Clip i of micro-batch m on rank r is a pure function of (data seed, r, m, i): a smooth random texture
seen through a window that moves by a constant integer velocity per frame, with the LQ frames made by
``cv2.resize(..., INTER_AREA)``. No files, no state, so a resumed run continues bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

from dlightning.data.config import DataConfig
from dlightning.data.transforms import collate_clips, derive_seed, to_tensor

_TAG_SYNTHETIC = 4
_MAX_SPEED = 3
"""Largest per-frame shift in HR pixels (keeps consecutive frames well aligned for the flow net)."""

PHASE_KIND = {"consistency": "video", "detail": "image"}


def synthetic_clip(rng: np.random.Generator, *, frames: int, size: int,
                   scale: int) -> tuple[np.ndarray, np.ndarray]:
    """One clip: HR (T, size, size, 3) and LQ (T, size/scale, size/scale, 3), uint8.

    Args:
        rng: Source of all randomness of the clip.
        frames: Number of frames T.
        size: HR side.
        scale: HR / LQ ratio.
    """
    margin = _MAX_SPEED * (frames - 1)
    canvas_side = size + 2 * margin
    grid = rng.random((size // 16 + 2, size // 16 + 2, 3), dtype=np.float32)
    canvas = cv2.resize(grid, (canvas_side, canvas_side), interpolation=cv2.INTER_CUBIC)
    canvas = np.clip(canvas * 255.0, 0, 255).astype(np.uint8)
    vy, vx = (int(v) for v in rng.integers(-_MAX_SPEED, _MAX_SPEED + 1, size=2))
    hr = np.stack([canvas[margin + t * vy: margin + t * vy + size, margin + t * vx: margin + t * vx + size]
                   for t in range(frames)])
    lq_side = size // scale
    lq = np.stack([cv2.resize(f, (lq_side, lq_side), interpolation=cv2.INTER_AREA) for f in hr])
    return hr, lq


class SyntheticBatchBuilder:
    """Builds micro-batch m of one rank from synthetic clips; ``kind`` follows the phase of m.

    Args:
        cfg: Data section (frames, crop_size, scale, batch_size, seed).
        rank: This rank (part of the seed).
        phase_fn: Micro-batch index -> phase.
    """

    def __init__(self, cfg: DataConfig, *, rank: int, phase_fn: Callable[[int], str]) -> None:
        self.cfg, self.rank, self.phase_fn = cfg, rank, phase_fn

    def build(self, micro_batch: int, epoch: int = 0) -> dict:
        """Batch dict of micro-batch ``micro_batch`` (``epoch`` is ignored: content depends on m only)."""
        cfg = self.cfg
        phase = self.phase_fn(micro_batch)
        if phase not in PHASE_KIND:
            raise ValueError(f"phase_fn({micro_batch}) returned {phase!r}; "
                             f"expected one of {list(PHASE_KIND)}")
        kind = PHASE_KIND[phase]
        clips = []
        for i in range(cfg.batch_size):
            rng = np.random.default_rng(derive_seed(cfg.seed, self.rank, micro_batch, i, _TAG_SYNTHETIC))
            hr, lq = synthetic_clip(rng, frames=cfg.frames, size=cfg.crop_size, scale=cfg.scale)
            clips.append({"hr": to_tensor(hr), "lq": to_tensor(lq), "caption": "", "kind": kind,
                          "key": f"synthetic_r{self.rank}_m{micro_batch}_{i}"})
        return collate_clips(clips, micro_batch=micro_batch, skipped={})
