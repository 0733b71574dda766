"""Skipping the CFR backward in the detail phase changes no gradient that trains there."""

from __future__ import annotations

import torch


def _grads(gen, lq, embeds, cfr_grad: bool) -> dict[str, torch.Tensor | None]:
    gen.zero_grad(set_to_none=True)
    out = gen(lq, embeds, targets=[1, 2], cfr_grad=cfr_grad)
    (out.images.square().mean() + out.latents.abs().mean()).backward()
    return {n: (p.grad.clone() if p.grad is not None else None) for n, p in gen.named_parameters()
            if p.requires_grad}


def test_cfr_grad_off_gives_zero_cfr_grads_and_identical_others(make_generator, randomize_trainables, tiny_lq):
    gen = make_generator()
    randomize_trainables(gen, 3)
    embeds = gen.encode_prompts([""] * tiny_lq.shape[0])
    full = _grads(gen, tiny_lq, embeds, cfr_grad=True)
    cheap = _grads(gen, tiny_lq, embeds, cfr_grad=False)
    cfr = {n for n in full if n.startswith("cfr.")}
    assert cfr and all(full[n] is not None and full[n].abs().sum() > 0 for n in cfr)
    # every trainable tensor still gets a gradient (DDP needs one), CFR's are exact zeros
    assert all(cheap[n] is not None for n in cheap)
    assert all(torch.count_nonzero(cheap[n]) == 0 for n in cfr)
    for n in full.keys() - cfr:
        torch.testing.assert_close(cheap[n], full[n], rtol=1e-5, atol=1e-7)
