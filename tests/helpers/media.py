"""Generated media and tiny models for the export / upscale / validation tests."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import torch


def write_video(path: Path, frames: list[np.ndarray], fps: int, audio: bool = False) -> Path:
    """Write RGB uint8 frames as H.264 (4:4:4, so odd sizes work), optionally with an AAC sine track."""
    h, w = frames[0].shape[:2]
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv444p"
        s.options = {"crf": "0"}
        a = c.add_stream("aac", rate=8000) if audio else None
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
        if a is not None:
            samples = (0.3 * np.sin(np.arange(8000) / 10.0)).astype(np.float32)[None]
            fr = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            fr.sample_rate = 8000
            for p in list(a.encode(fr)) + list(a.encode(None)):
                c.mux(p)
    return path


def smooth_frames(n: int, h: int, w: int, seed: int = 0) -> list[np.ndarray]:
    """A slowly moving smooth colour pattern (compresses well, gives meaningful flows)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    phase = rng.uniform(0, 6, 3)
    out = []
    for t in range(n):
        chans = [np.sin((xx + 1.5 * t) / 5.0 + phase[c]) * np.cos(yy / 7.0 + c) for c in range(3)]
        out.append(((np.stack(chans, -1) + 1) * 127.5).clip(0, 255).astype(np.uint8))
    return out


def tiny_model_config(**overrides):
    """Tiny preset with a small CFR (keeps CPU tests fast)."""
    from dlightning.models.config import CFRConfig, ModelConfig

    kwargs = {"preset": "tiny", "scale": 4, "seed": 0, "cfr": CFRConfig(heads=2, embed_dim=8)}
    kwargs.update(overrides)
    return ModelConfig(**kwargs)


def randomized_generator(seed: int = 7, std: float = 0.05, **overrides):
    """Tiny generator in eval mode with every trainable tensor perturbed (LoRA B no longer zero)."""
    from dlightning.models.generator import DLoRALGenerator

    gen = DLoRALGenerator(tiny_model_config(**overrides)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for params in gen.parameter_groups().values():
            for p in params:
                p.add_(torch.randn(p.shape, generator=g) * std)
    return gen
