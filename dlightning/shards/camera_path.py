"""Pseudo-videos from one image: a smooth random camera path rendered with ``cv2.warpAffine``.

A pose is ``[tx, ty, angle_deg, scale]``: the crop centre's offset in image pixels from the image
centre, the camera roll in degrees (counter-clockwise) and the zoom (> 1 shows less of the image).
Paths are smooth because each pose parameter moves with a momentum-damped random velocity.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

INTERPOLATIONS = {"cubic": cv2.INTER_CUBIC, "lanczos": cv2.INTER_LANCZOS4, "linear": cv2.INTER_LINEAR}


@dataclass
class CameraPathConfig:
    """Random smooth camera path (image -> pseudo-video)."""

    max_step: float = 4.0
    """Largest per-frame translation increment (pixels) of the velocity's random kick."""
    momentum: float = 0.8
    """Velocity carried over per frame (0 = jitter, close to 1 = straight glides)."""
    max_rotation_deg: float = 2.0
    """Bound on the absolute roll."""
    rotation_step_deg: float = 0.5
    max_zoom_delta: float = 0.05
    """Zoom stays in [1 - d, 1 + d]."""
    zoom_step: float = 0.01
    integer_translation: bool = False
    """Round translations to whole pixels (with no rotation/zoom, frames are then exact crops)."""
    interpolation: str = "cubic"
    """cubic / lanczos / linear."""


def _smooth_walk(rng: np.random.Generator, n: int, step: float, momentum: float, bound: float) -> np.ndarray:
    """Offsets from a momentum-filtered random velocity (|velocity| <= step), kept in [-bound, bound].

    The velocity bounces off the bounds, so the path never sticks to an edge.
    """
    values = np.zeros(n, dtype=np.float64)
    if bound <= 0 or step <= 0:
        return values
    velocity = float(rng.uniform(-step, step))
    for i in range(1, n):
        velocity = float(np.clip(momentum * velocity + rng.uniform(-step, step), -step, step))
        nxt = values[i - 1] + velocity
        if abs(nxt) > bound:
            velocity = -velocity
            nxt = float(np.clip(values[i - 1] + velocity, -bound, bound))
        values[i] = nxt
    return values


def sample_camera_path(
    rng: np.random.Generator,
    num_frames: int,
    image_hw: tuple[int, int],
    crop_hw: tuple[int, int],
    cfg: CameraPathConfig,
) -> list[list[float]]:
    """Draw a smooth path of ``num_frames`` poses whose translations keep the crop inside the image.

    Returns:
        Per-frame ``[tx, ty, angle_deg, scale]``.
    """
    margin_y = max(0.0, (image_hw[0] - crop_hw[0]) / 2.0)
    margin_x = max(0.0, (image_hw[1] - crop_hw[1]) / 2.0)
    # Start somewhere inside, leaving room for the path to move.
    start_x = float(rng.uniform(-0.5, 0.5)) * margin_x
    start_y = float(rng.uniform(-0.5, 0.5)) * margin_y
    dx = _smooth_walk(rng, num_frames, cfg.max_step, cfg.momentum, margin_x)
    dy = _smooth_walk(rng, num_frames, cfg.max_step, cfg.momentum, margin_y)
    tx = np.clip(start_x + dx, -margin_x, margin_x)
    ty = np.clip(start_y + dy, -margin_y, margin_y)
    if cfg.integer_translation:
        tx, ty = np.rint(tx), np.rint(ty)
    angle = _smooth_walk(rng, num_frames, cfg.rotation_step_deg, cfg.momentum, cfg.max_rotation_deg)
    zoom = 1.0 + _smooth_walk(rng, num_frames, cfg.zoom_step, cfg.momentum, cfg.max_zoom_delta)
    return [[float(a), float(b), float(c), float(d)] for a, b, c, d in zip(tx, ty, angle, zoom, strict=True)]


def linear_pan_zoom_path(num_frames: int, start: list[float], end: list[float]) -> list[list[float]]:
    """A constant-velocity pan/zoom from pose ``start`` to pose ``end`` (both ``[tx, ty, angle, scale]``)."""
    ts = np.linspace(0.0, 1.0, num_frames)
    s, e = np.asarray(start, dtype=np.float64), np.asarray(end, dtype=np.float64)
    return [[float(v) for v in s + t * (e - s)] for t in ts]


def pose_matrix(pose: list[float], image_hw: tuple[int, int], crop_hw: tuple[int, int]) -> np.ndarray:
    """2x3 affine mapping image coordinates to crop coordinates for one pose."""
    tx, ty, angle, zoom = pose
    cx = (image_hw[1] - 1) / 2.0 + tx
    cy = (image_hw[0] - 1) / 2.0 + ty
    m = cv2.getRotationMatrix2D((cx, cy), angle, zoom)
    # getRotationMatrix2D keeps (cx, cy) fixed; move it to the crop centre.
    m[0, 2] += (crop_hw[1] - 1) / 2.0 - cx
    m[1, 2] += (crop_hw[0] - 1) / 2.0 - cy
    return m


def render_camera_path(
    image: np.ndarray, path: list[list[float]], crop_hw: tuple[int, int], interpolation: str = "cubic"
) -> np.ndarray:
    """Render one crop per pose with ``cv2.warpAffine`` (reflect-101 borders).

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        path: Per-frame poses.
        crop_hw: Output ``(h, w)``.
        interpolation: ``cubic``, ``lanczos`` or ``linear``.

    Returns:
        ``(T, h, w, 3)`` uint8 frames.
    """
    flags = INTERPOLATIONS[interpolation]
    image_hw = image.shape[:2]
    frames = [
        cv2.warpAffine(
            image,
            pose_matrix(p, image_hw, crop_hw),
            (crop_hw[1], crop_hw[0]),
            flags=flags,
            borderMode=cv2.BORDER_REFLECT_101,
        )
        for p in path
    ]
    return np.stack(frames)
