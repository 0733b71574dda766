"""CFR: thresholded cross-frame attention (dense, blockwise, top-k) and the retrieval module."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dlightning.errors import MissingWeightsError
from dlightning.models.cfr import CrossFrameAttention, CrossFrameRetrieval
from dlightning.models.config import CFRConfig


def _make_attention(seed: int = 0, **kwargs) -> CrossFrameAttention:
    torch.manual_seed(seed)
    attn = CrossFrameAttention(**kwargs).double()
    # A fixed threshold bias keeps a mix of active and inactive ReLU entries across seeds.
    with torch.no_grad():
        attn.threshold_fc.bias.fill_(0.1)
    return attn


def _naive_heads_reference(attn: CrossFrameAttention, cur: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """Reference written with einsum and an explicit loop over heads, channel c of head j = j*d + c."""
    n, c, h, w = cur.shape
    d = attn.embed_dim

    def conv1x1(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("oc,nchw->nohw", conv.weight[:, :, 0, 0], x) + conv.bias.view(1, -1, 1, 1)

    q_all = conv1x1(attn.query_conv, cur).flatten(2)
    k_all = conv1x1(attn.key_conv, prev).flatten(2)
    v_all = conv1x1(attn.value_conv, prev).flatten(2)
    head_outs = []
    for j in range(attn.heads):
        q, k, v = (t[:, j * d:(j + 1) * d] for t in (q_all, k_all, v_all))  # (n, d, N)
        s = torch.einsum("ndi,ndk->nik", q, k) / math.sqrt(d)
        tau = torch.einsum("ndi,d->ni", q, attn.threshold_fc.weight[0]) + attn.threshold_fc.bias[0]
        a = torch.clamp((s - tau[:, :, None]) / attn.temperature, min=0)
        head_outs.append(torch.einsum("nik,ndk->ndi", a, v))
    o = torch.cat(head_outs, dim=1).view(n, attn.heads * d, h, w)
    return conv1x1(attn.proj_out, o)


def _inputs(shape=(2, 4, 5, 6), seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cur = torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
    prev = torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
    return cur, prev


def test_parameter_count_matches_method_md() -> None:
    attn = CrossFrameAttention(in_channels=4, heads=9, embed_dim=64)
    assert sum(p.numel() for p in attn.parameters()) == 11_013
    assert set(attn.state_dict()) == {
        f"{m}.{p}" for m in ("query_conv", "key_conv", "value_conv", "proj_out", "threshold_fc")
        for p in ("weight", "bias")
    }
    assert isinstance(attn.temperature, float)


def test_dense_matches_per_position_loop() -> None:
    attn = _make_attention(heads=2, embed_dim=4, temperature=0.5, block_size=0)
    cur, prev = _inputs((1, 4, 3, 3))
    out = attn(cur, prev).detach()
    attn.requires_grad_(False)
    cur, prev = cur.detach(), prev.detach()

    # Plain python loops over heads, query positions and key positions.
    d, n_pos = 4, 9
    q = attn.query_conv(cur)[0].reshape(2 * d, n_pos)
    k = attn.key_conv(prev)[0].reshape(2 * d, n_pos)
    v = attn.value_conv(prev)[0].reshape(2 * d, n_pos)
    o = torch.zeros(2 * d, n_pos, dtype=torch.float64)
    w_fc, b_fc = attn.threshold_fc.weight[0], attn.threshold_fc.bias[0]
    for head in range(2):
        rows = slice(head * d, (head + 1) * d)
        for i in range(n_pos):
            tau = float((q[rows, i] * w_fc).sum() + b_fc)
            for j in range(n_pos):
                s = float((q[rows, i] * k[rows, j]).sum()) / math.sqrt(d)
                a = max(0.0, (s - tau) / 0.5)
                o[rows, i] += a * v[rows, j]
    expected = attn.proj_out(o.reshape(1, 2 * d, 3, 3))
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("block_size", [0, 1, 7, 30, 64])
@pytest.mark.parametrize("checkpoint_blocks", [True, False])
def test_blockwise_matches_naive_reference_forward_and_grads(
    block_size: int, checkpoint_blocks: bool
) -> None:
    # N = 5 * 6 = 30; block 7 does not divide it, 64 exceeds it.
    attn = _make_attention(
        heads=3, embed_dim=4, temperature=0.7, block_size=block_size, checkpoint_blocks=checkpoint_blocks
    )
    cur, prev = _inputs()
    out = attn(cur, prev)
    ref = _naive_heads_reference(attn, cur, prev)
    torch.testing.assert_close(out, ref)
    assert out.abs().max() > 0

    grad_out = torch.randn_like(out)
    params = [cur, prev, *attn.parameters()]
    got = torch.autograd.grad(out, params, grad_out)
    want = torch.autograd.grad(ref, params, grad_out)
    for g1, g2 in zip(got, want, strict=True):
        torch.testing.assert_close(g1, g2)


def test_blockwise_float32_matches_dense() -> None:
    torch.manual_seed(0)
    dense = CrossFrameAttention(heads=9, embed_dim=64, temperature=30.0, block_size=0)
    blocked = CrossFrameAttention(heads=9, embed_dim=64, temperature=30.0, block_size=10)
    blocked.load_state_dict(dense.state_dict())
    cur, prev = torch.randn(1, 4, 6, 7), torch.randn(1, 4, 6, 7)
    torch.testing.assert_close(blocked(cur, prev), dense(cur, prev), rtol=1e-5, atol=1e-6)


def test_topk_all_equals_dense() -> None:
    dense = _make_attention(heads=3, embed_dim=4, temperature=0.7, block_size=0)
    full_k = _make_attention(heads=3, embed_dim=4, temperature=0.7, block_size=7, topk=30)
    cur, prev = _inputs()
    torch.testing.assert_close(full_k(cur, prev), dense(cur, prev))


@pytest.mark.parametrize("block_size", [0, 4])
def test_topk_one_matches_handwritten_reference(block_size: int) -> None:
    attn = _make_attention(heads=2, embed_dim=4, temperature=0.5, block_size=block_size, topk=1)
    dense = _make_attention(heads=2, embed_dim=4, temperature=0.5, block_size=0)
    cur, prev = (t.detach() for t in _inputs((1, 4, 3, 4)))
    attn.requires_grad_(False)
    out = attn(cur, prev)

    d, n_pos = 4, 12
    q = attn.query_conv(cur)[0].reshape(2 * d, n_pos)
    k = attn.key_conv(prev)[0].reshape(2 * d, n_pos)
    v = attn.value_conv(prev)[0].reshape(2 * d, n_pos)
    o = torch.zeros(2 * d, n_pos, dtype=torch.float64)
    for head in range(2):
        rows = slice(head * d, (head + 1) * d)
        for i in range(n_pos):
            sims = [float((q[rows, i] * k[rows, j]).sum()) / math.sqrt(d) for j in range(n_pos)]
            best = max(range(n_pos), key=lambda j: sims[j])
            tau = float((q[rows, i] * attn.threshold_fc.weight[0]).sum() + attn.threshold_fc.bias[0])
            o[rows, i] = max(0.0, (sims[best] - tau) / 0.5) * v[rows, best]
    torch.testing.assert_close(out, attn.proj_out(o.reshape(1, 2 * d, 3, 4)))
    assert not torch.allclose(out, dense(cur, prev))


def test_blockwise_checkpoint_keeps_backward_memory_linear() -> None:
    # Record the largest tensor autograd keeps for backward: dense keeps (n, heads, N, N) maps;
    # checkpointed blocks keep only O(N * heads * d) inputs.
    heads, d, h, w = 2, 4, 8, 8
    n_pos = h * w

    def largest_saved(block_size: int) -> int:
        attn = _make_attention(heads=heads, embed_dim=d, temperature=1.0, block_size=block_size)
        cur, prev = _inputs((1, 4, h, w))
        sizes: list[int] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            attn(cur, prev).sum().backward()
        return max(sizes)

    assert largest_saved(0) >= heads * n_pos * n_pos
    assert largest_saved(8) <= heads * d * n_pos


def _tiny_cfg(**kwargs) -> CFRConfig:
    return CFRConfig(heads=2, embed_dim=4, block_size=16, **kwargs)


def test_cfr_shapes_and_zero_flow_identity() -> None:
    torch.manual_seed(0)
    cfr = CrossFrameRetrieval(_tiny_cfg())
    lq = torch.rand(2, 3, 48, 64) * 2 - 1
    flow = cfr.compute_flow(lq, lq)
    assert flow.shape == (2, 2, 6, 8) and not flow.requires_grad
    z_prev, z_cur = torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8)
    fused, warped = cfr(z_prev, z_cur, torch.zeros(2, 2, 6, 8))
    assert fused.shape == warped.shape == (2, 4, 6, 8)
    torch.testing.assert_close(warped, z_prev)
    torch.testing.assert_close(fused, z_cur + cfr.cross_attn_module(z_cur, z_prev))


def test_cfr_warps_previous_latent_by_flow() -> None:
    cfr = CrossFrameRetrieval(_tiny_cfg())
    z_prev = torch.randn(1, 4, 6, 8)
    flow = torch.zeros(1, 2, 6, 8)
    flow[:, 0] = 1.0  # current pixel x reads previous pixel x + 1
    _, warped = cfr(z_prev, torch.randn(1, 4, 6, 8), flow)
    torch.testing.assert_close(warped[..., :-1], z_prev[..., 1:])
    assert torch.all(warped[..., -1] == 0)


class _RecordingFlow(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, ref: torch.Tensor, supp: torch.Tensor) -> torch.Tensor:
        self.calls.append((ref, supp))
        return torch.zeros(ref.shape[0], 2, *ref.shape[-2:])


@pytest.mark.parametrize("input_range", ["minus_one_one", "zero_one"])
def test_compute_flow_feeds_downsampled_frames_cur_as_ref(input_range: str) -> None:
    cfr = CrossFrameRetrieval(_tiny_cfg(spynet_input_range=input_range))
    cfr.spynet = _RecordingFlow()
    lq_prev = torch.full((1, 3, 32, 40), -0.5)
    lq_cur = torch.full((1, 3, 32, 40), 0.5)
    cfr.compute_flow(lq_prev, lq_cur)
    ref, supp = cfr.spynet.calls[0]
    assert ref.shape == supp.shape == (1, 3, 4, 5)
    # Bicubic resize of a constant frame is that constant; "zero_one" maps [-1, 1] to [0, 1].
    cur_value, prev_value = (0.5, -0.5) if input_range == "minus_one_one" else (0.75, 0.25)
    torch.testing.assert_close(ref, torch.full_like(ref, cur_value))
    torch.testing.assert_close(supp, torch.full_like(supp, prev_value))


def test_only_cross_attention_trains() -> None:
    cfr = CrossFrameRetrieval(_tiny_cfg())
    trainable = cfr.trainable_parameters()
    assert {id(p) for p in trainable} == {id(p) for p in cfr.cross_attn_module.parameters()}
    assert not any(p.requires_grad for p in cfr.spynet.parameters())
    lq = torch.rand(1, 3, 64, 64) * 2 - 1
    flow = cfr.compute_flow(lq, lq.flip(-1))
    fused, _ = cfr(torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), flow)
    fused.square().sum().backward()
    assert all(p.grad is not None for p in trainable)
    assert all(p.grad is None for p in cfr.spynet.parameters())


def test_reference_state_dict_round_trip_ignores_unused_subnets() -> None:
    torch.manual_seed(1)
    src = CrossFrameRetrieval(CFRConfig())
    sd = src.reference_state_dict()
    assert sum(k.startswith("spynet.basic_module.") for k in sd) == 60
    assert "cross_attn_module.threshold_fc.weight" in sd
    # The official state_dict_bpp also holds unused sub-networks; they must be ignored.
    sd = {**sd, "feat_extract.main.0.weight": torch.zeros(64, 4, 3, 3), "conv_last.bias": torch.zeros(4)}
    del sd["spynet.mean"], sd["spynet.std"]
    torch.manual_seed(2)
    dst = CrossFrameRetrieval(CFRConfig())
    dst.load_reference_state_dict(sd)
    for k, v in dst.reference_state_dict().items():
        torch.testing.assert_close(v, src.reference_state_dict()[k], msg=k)


def test_load_reference_state_dict_rejects_missing_keys() -> None:
    cfr = CrossFrameRetrieval(_tiny_cfg())
    sd = cfr.reference_state_dict()
    del sd["cross_attn_module.proj_out.bias"]
    with pytest.raises(MissingWeightsError, match="proj_out.bias"):
        cfr.load_reference_state_dict(sd)
    sd = cfr.reference_state_dict()
    del sd["spynet.basic_module.5.basic_module.0.conv.weight"]
    with pytest.raises(MissingWeightsError, match="basic_module.5"):
        cfr.load_reference_state_dict(sd)
    # A parity-size checkpoint does not fit a model with other heads / embed_dim.
    with pytest.raises(MissingWeightsError, match="mis-shaped"):
        cfr.load_reference_state_dict(CrossFrameRetrieval(CFRConfig()).reference_state_dict())
