"""Tiled VAE encode / decode with GroupNorm statistics shared over all tiles (docs/METHOD.md 7.5).

diffusers' ``enable_tiling()`` normalises every tile with its own GroupNorm statistics, so tiles
disagree with the whole-frame result. Here the encoder / decoder run as a *program* of the module's own
layers, split at every GroupNorm: each stage runs over all tiles (one tile on the device at a time, the
others parked on ``store``), collecting the per-tile mean / variance of the tile's core region (its
padding margin excluded); the stage's GroupNorm then normalises every tile with the exact whole-frame
statistics (parallel-variance combination, not just the mean of per-tile variances).

The mid-block self-attention is global: it runs on the whole feature map stitched from the tile cores
(it sits at latent resolution, 1/8 of the frame, so this is affordable), and every tile, padding
included, is re-cut from its output. What remains tile-dependent is only the convolutions'
receptive field beyond the padding margin (``padding`` latents on each side of a tile core).

Supported: diffusers ``Encoder`` / ``Decoder`` of ``AutoencoderKL`` built from ``DownEncoderBlock2D`` /
``UpDecoderBlock2D`` and ``UNetMidBlock2D`` with GroupNorm (SD 1.x / 2.x / XL VAEs, the tiny preset).
Other layouts raise ``ValueError`` (use ``upscale.vae_tiling=diffusers``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

State = dict[str, torch.Tensor | None]


@dataclass(frozen=True)
class _Tile:
    """A tile in latent units: core ``[y0, y1) x [x0, x1)`` inside its padded span ``[py0, py1) x [px0, px1)``."""

    y0: int
    y1: int
    x0: int
    x1: int
    py0: int
    py1: int
    px0: int
    px1: int

    def core(self, t: torch.Tensor) -> tuple[slice, slice]:
        """Slices of the core in a tile tensor ``t`` at any resolution (factor from the tensor's size)."""
        fy, fx = t.shape[-2] / (self.py1 - self.py0), t.shape[-1] / (self.px1 - self.px0)
        return (slice(round((self.y0 - self.py0) * fy), round((self.y1 - self.py0) * fy)),
                slice(round((self.x0 - self.px0) * fx), round((self.x1 - self.px0) * fx)))


def _spans(size: int, tile: int) -> list[tuple[int, int]]:
    n = math.ceil(size / tile)
    bounds = [round(i * size / n) for i in range(n + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def plan_tiles(h: int, w: int, tile: int, padding: int) -> list[_Tile]:
    """Near-equal core tiles of at most ``tile`` latents covering ``h x w``, each padded by ``padding``."""
    if tile < 1 or padding < 0:
        raise ValueError(f"need tile >= 1 and padding >= 0, got {tile}, {padding}")
    return [_Tile(y0, y1, x0, x1, max(0, y0 - padding), min(h, y1 + padding), max(0, x0 - padding),
                  min(w, x1 + padding))
            for y0, y1 in _spans(h, tile) for x0, x1 in _spans(w, tile)]


# ---------------------------------------------------------------------------------------------- program
@dataclass
class _Local:
    """A per-position (up to its receptive field) op on the tile state."""

    fn: Callable[[State], State]


@dataclass
class _Norm:
    """A GroupNorm: a barrier where whole-frame statistics of ``x`` are needed."""

    norm: nn.GroupNorm


@dataclass
class _Attention:
    """A global attention over the whole feature map."""

    attn: nn.Module


def _apply(module: Callable) -> _Local:
    def fn(s: State) -> State:
        return {**s, "x": module(s["x"])}

    return _Local(fn)


def _resnet_ops(block: nn.Module) -> list:
    """ResnetBlock2D without time embedding, re-sequenced from its own layers."""
    if not (isinstance(block.norm1, nn.GroupNorm) and isinstance(block.norm2, nn.GroupNorm)
            and block.upsample is None and block.downsample is None):
        raise ValueError(f"tiled VAE: unsupported resnet layout {type(block).__name__}; "
                         "use upscale.vae_tiling=diffusers")
    shortcut = block.conv_shortcut
    scale = float(block.output_scale_factor)

    def save(s: State) -> State:
        return {**s, "skip": s["x"]}

    def residual(s: State) -> State:
        skip = s["skip"] if shortcut is None else shortcut(s["skip"])
        return {"x": (skip + s["x"]) / scale, "skip": None}

    act = block.nonlinearity
    return [_Local(save), _Norm(block.norm1), _apply(act), _apply(block.conv1), _Norm(block.norm2), _apply(act),
            _apply(block.dropout), _apply(block.conv2), _Local(residual)]


def _mid_ops(mid: nn.Module) -> list:
    ops = _resnet_ops(mid.resnets[0])
    for attn, res in zip(mid.attentions, mid.resnets[1:], strict=True):
        if attn is not None:
            ops.append(_Attention(attn))
        ops += _resnet_ops(res)
    return ops


def _check_norm_out(norm: nn.Module) -> nn.GroupNorm:
    if not isinstance(norm, nn.GroupNorm):
        raise ValueError(f"tiled VAE: unsupported output norm {type(norm).__name__}; use upscale.vae_tiling=diffusers")
    return norm


def _block_ops(blocks: nn.ModuleList, samplers: str, kind: str) -> list:
    """Resnets then up/down-samplers of each block; blocks with attention are refused."""
    ops: list = []
    for block in blocks:
        if getattr(block, "attentions", None):
            raise ValueError(f"tiled VAE: {kind} blocks with attention are unsupported; "
                             "use upscale.vae_tiling=diffusers")
        for res in block.resnets:
            ops += _resnet_ops(res)
        ops += [_apply(sampler) for sampler in getattr(block, samplers) or []]
    return ops


def _tail_ops(coder: nn.Module) -> list:
    return [_Norm(_check_norm_out(coder.conv_norm_out)), _apply(coder.conv_act), _apply(coder.conv_out)]


def decoder_program(decoder: nn.Module) -> list:
    """The ops of a diffusers VAE ``Decoder`` (without ``latent_embeds``) in execution order."""
    return ([_apply(decoder.conv_in)] + _mid_ops(decoder.mid_block)
            + _block_ops(decoder.up_blocks, "upsamplers", "up") + _tail_ops(decoder))


def encoder_program(encoder: nn.Module) -> list:
    """The ops of a diffusers VAE ``Encoder`` in execution order."""
    return ([_apply(encoder.conv_in)] + _block_ops(encoder.down_blocks, "downsamplers", "down")
            + _mid_ops(encoder.mid_block) + _tail_ops(encoder))


# --------------------------------------------------------------------------------------------- executor
def _tile_stats(x: torch.Tensor, groups: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Element count, mean and (biased) variance per (sample, group) of ``x (N, C, h, w)``."""
    xg = x.float().reshape(x.shape[0], groups, -1)
    var, mean = torch.var_mean(xg, dim=-1, unbiased=False)
    return xg.shape[-1], mean.double().cpu(), var.double().cpu()


def _combine(stats: list[tuple[int, torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole-frame mean / variance from per-tile ones (exact: within- plus between-tile variance)."""
    total = sum(n for n, _, _ in stats)
    mean = sum(n * m for n, m, _ in stats) / total
    var = sum(n * (v + (m - mean) ** 2) for n, m, v in stats) / total
    return mean, var


def _group_norm_with(norm: nn.GroupNorm, mean: torch.Tensor, var: torch.Tensor) -> _Local:
    """GroupNorm ``norm`` applied with fixed statistics ``(N, G)``."""

    def fn(s: State) -> State:
        x = s["x"]
        n, c = x.shape[:2]
        m = mean.to(x.device, torch.float32)[:, :, None]
        rstd = torch.rsqrt(var.to(x.device, torch.float32) + norm.eps)[:, :, None]
        y = ((x.float().reshape(n, norm.num_groups, -1) - m) * rstd).reshape(x.shape)
        if norm.affine:
            y = y * norm.weight.float()[None, :, None, None] + norm.bias.float()[None, :, None, None]
        return {**s, "x": y.to(x.dtype)}

    return _Local(fn)


def _move(s: State, device: torch.device) -> State:
    return {k: (v.to(device) if v is not None else None) for k, v in s.items()}


class _Runner:
    """Runs a program over tiles, one device-resident tile at a time, synchronising at barriers."""

    def __init__(self, tiles: list[_Tile], states: list[State], device: torch.device, store: torch.device,
                 size: tuple[int, int]) -> None:
        self.tiles, self.states, self.device, self.store, self.size = tiles, states, device, store, size
        self.pending: list[_Local] = []

    def _flush(self, groups: int | None = None) -> list | None:
        """Apply pending local ops to every tile; with ``groups``, return the cores' per-tile statistics."""
        stats = []
        for i, tile in enumerate(self.tiles):
            s = _move(self.states[i], self.device)
            for op in self.pending:
                s = op.fn(s)
            if groups is not None:
                ys, xs = tile.core(s["x"])
                stats.append(_tile_stats(s["x"][..., ys, xs], groups))
            self.states[i] = _move(s, self.store)
        self.pending = []
        return stats if groups is not None else None

    def _stitch(self) -> torch.Tensor:
        """Whole feature map from the tile cores, on the device."""
        h, w = self.size
        first = self.states[0]["x"]
        fy = first.shape[-2] // (self.tiles[0].py1 - self.tiles[0].py0)
        fx = first.shape[-1] // (self.tiles[0].px1 - self.tiles[0].px0)
        out = first.new_empty((*first.shape[:2], h * fy, w * fx), device=self.device)
        for tile, s in zip(self.tiles, self.states, strict=True):
            ys, xs = tile.core(s["x"])
            out[..., tile.y0 * fy: tile.y1 * fy, tile.x0 * fx: tile.x1 * fx] = s["x"][..., ys, xs].to(self.device)
        return out

    def run(self, program: list) -> torch.Tensor:
        for op in program:
            if isinstance(op, _Local):
                self.pending.append(op)
            elif isinstance(op, _Norm):
                mean, var = _combine(self._flush(op.norm.num_groups))
                self.pending.append(_group_norm_with(op.norm, mean, var))
            else:  # global attention on the stitched map, then every tile (padding included) re-cut from it
                self._flush()
                whole = op.attn(self._stitch())
                fy, fx = whole.shape[-2] // self.size[0], whole.shape[-1] // self.size[1]
                for i, t in enumerate(self.tiles):
                    crop = whole[..., t.py0 * fy: t.py1 * fy, t.px0 * fx: t.px1 * fx]
                    self.states[i] = {**self.states[i], "x": crop.to(self.store)}
        self._flush()
        return self._stitch()


@torch.no_grad()
def run_tiled(program: list, x: torch.Tensor, latent_size: tuple[int, int], tile: int, padding: int,
              store: torch.device | str = "cpu") -> torch.Tensor:
    """Run an encoder / decoder ``program`` on ``x`` tile by tile with shared GroupNorm statistics.

    Args:
        program: From :func:`decoder_program` or :func:`encoder_program`.
        x: Input ``(N, C, r*h, r*w)`` (``r`` = 1 for latents, 8 for images).
        latent_size: ``(h, w)``, the latent grid the tiles are laid on.
        tile: Core tile side in latents.
        padding: Margin in latents on each side of a core (clipped at the frame border).
        store: Where the tiles wait between stages (``cpu`` keeps device memory bounded by one tile).

    Returns:
        The program's output for the whole input, on ``x``'s device.
    """
    h, w = latent_size
    ry, rx = x.shape[-2] // h, x.shape[-1] // w
    tiles = plan_tiles(h, w, tile, padding)
    store = torch.device(store)
    states: list[State] = [{"x": x[..., t.py0 * ry: t.py1 * ry, t.px0 * rx: t.px1 * rx].to(store), "skip": None}
                           for t in tiles]
    return _Runner(tiles, states, x.device, store, (h, w)).run(program)


def decode_tiled(decoder: nn.Module, z: torch.Tensor, tile: int, padding: int = 11,
                 store: torch.device | str = "cpu") -> torch.Tensor:
    """``decoder(z)`` of a diffusers VAE ``Decoder`` computed in ``tile``-latent tiles (see :func:`run_tiled`)."""
    return run_tiled(decoder_program(decoder), z, tuple(z.shape[-2:]), tile, padding, store)


def encode_tiled(encoder: nn.Module, images: torch.Tensor, tile: int, padding: int = 11,
                 store: torch.device | str = "cpu") -> torch.Tensor:
    """``encoder(images)`` of a diffusers VAE ``Encoder`` in tiles of ``tile`` latents (``8 * tile`` px).

    ``images`` must have sides divisible by 8 (the encoder's total downsampling factor).
    """
    h, w = images.shape[-2:]
    if h % 8 or w % 8:
        raise ValueError(f"tiled VAE encode needs image sides divisible by 8, got {h}x{w}")
    return run_tiled(encoder_program(encoder), images, (h // 8, w // 8), tile, padding, store)


@contextmanager
def shared_norm_tiling(vae: nn.Module, tile_px: int, padding: int = 11,
                       store: torch.device | str = "cpu") -> Iterator[None]:
    """Within the block, ``vae.encode`` / ``vae.decode`` tile frames larger than ``tile_px`` pixels.

    Frames that fit stay on the untiled path. The VAE's own forwards are restored on exit, so the model
    is unchanged outside the block (a training generator validated with it keeps its untiled, differentiable
    VAE). diffusers' own tiling is switched off inside the block.

    Args:
        vae: A diffusers ``AutoencoderKL``.
        tile_px: Tile side in pixels (``tile_px // 8`` latents); 0 = never tile.
        padding: Tile margin in latents.
        store: Where tiles wait between stages.
    """
    tile = tile_px // 8
    enc, dec = vae.encoder, vae.decoder
    saved = {m: m.__dict__.get("forward") for m in (enc, dec)}
    enc_forward, dec_forward = enc.forward, dec.forward
    use_tiling = getattr(vae, "use_tiling", False)

    def encode(sample: torch.Tensor) -> torch.Tensor:
        if tile and max(sample.shape[-2:]) > tile_px:
            return encode_tiled(enc, sample, tile, padding, store)
        return enc_forward(sample)

    def decode(sample: torch.Tensor, latent_embeds: torch.Tensor | None = None) -> torch.Tensor:
        if tile and latent_embeds is None and max(sample.shape[-2:]) > tile:
            return decode_tiled(dec, sample, tile, padding, store)
        return dec_forward(sample, latent_embeds)

    enc.forward, dec.forward = encode, decode
    vae.use_tiling = False
    try:
        yield
    finally:
        vae.use_tiling = use_tiling
        for m, fwd in saved.items():
            if fwd is None:
                del m.forward
            else:
                m.forward = fwd
