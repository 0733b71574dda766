"""Inference encodes each frame once (``upscale.reuse_latents``) and gives the frames of the old path."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from helpers.media import randomized_generator, smooth_frames

from dlightning.inference.config import UpscaleConfig
from dlightning.inference.pipeline import Upscaler


@pytest.fixture(scope="module")
def gen():
    return randomized_generator()


def _run(gen, frames, **cfg) -> tuple[list[np.ndarray], int]:
    """Upscaled frames and how many frames the VAE encoder saw."""
    encoded = []
    real = gen.encode_latents

    def counting(images, generator=None):
        encoded.append(images.shape[0])
        return real(images, generator=generator)

    gen.encode_latents = counting
    try:
        out = list(Upscaler(gen, UpscaleConfig(min_short_side=0, **cfg)).upscale_frames(frames))
    finally:
        del gen.encode_latents
    return out, sum(encoded)


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_each_frame_is_encoded_once_and_the_frames_are_unchanged(gen, batch):
    frames = smooth_frames(7, 16, 24)
    old, old_encoded = _run(gen, frames, batch_windows=batch, reuse_latents=False)
    new, new_encoded = _run(gen, frames, batch_windows=batch, reuse_latents=True)
    assert len(new) == len(old) == 7
    chunks = -(-7 // batch)
    assert old_encoded == 7 + chunks  # each chunk encodes its previous frame again
    assert new_encoded == 7
    # Same windows, same latents: only the batch composition of the convolutions differs.
    worst = max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(old, new, strict=True))
    assert worst <= 1


def test_sampled_latents_keep_one_draw_per_window(gen):
    """With ``vae_latent=sample`` the old path is kept: a reused latent would change the random stream."""
    sampled = randomized_generator()
    sampled.cfg = dataclasses.replace(sampled.cfg, vae_latent="sample")
    frames = smooth_frames(4, 16, 24)
    _, encoded = _run(sampled, frames, batch_windows=2, reuse_latents=True)
    assert encoded == 4 + 2
