"""Upscaling throughput: frames/s and peak memory of ``dlightning.inference.pipeline.Upscaler``.

    python benchmarks/bench_inference.py                       # CPU smoke: tiny preset, tiny frames
    python benchmarks/bench_inference.py --device cuda --full  # SD 2.1 size (random weights), bf16

Every frame of a synthetic clip is produced (frame 0 from the window (0, 0)), colour fix included.
Settings crossed: LQ size (full: 128x128 -> 512x512 and 854x480 -> 4x; CPU: 16x16 and 40x24),
merged (C- and D-LoRA fused with ``dlightning.export.fuse_families`` on a copy) vs unmerged LoRA,
windows per UNet call (``upscale.batch_windows`` 1 / 4), torch.compile of the UNet (off by default
on CPU), channels-last UNet and VAE. docs/DESIGN.md target: >= 20 frames/s, merged, 128 -> 512, H100, bf16.
"""

from __future__ import annotations

import argparse
import copy
import gc
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from breakdown import breakdown_table, profile_call  # noqa: E402
from common import (  # noqa: E402
    add_common_args,
    build_random_sd21,
    emit,
    header,
    markdown_table,
    peak_memory,
    resolve_device,
    synchronize,
)

from dlightning.data.synthetic import synthetic_clip  # noqa: E402
from dlightning.export import fuse_families  # noqa: E402
from dlightning.inference.config import UpscaleConfig  # noqa: E402
from dlightning.inference.pipeline import Upscaler  # noqa: E402
from dlightning.models.config import ModelConfig  # noqa: E402
from dlightning.models.generator import DLoRALGenerator  # noqa: E402

FULL_SIZES = {"128": (128, 128), "480p": (480, 854)}
TINY_SIZES = {"16": (16, 16), "24x40": (24, 40)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def base_generator(full: bool, device: torch.device, pretrained: str | None = None) -> DLoRALGenerator:
    """The trained-generator stand-in (fp32, LoRA unmerged), on ``device``: from a model folder in the
    diffusers layout (``model.pretrained_path``), SD 2.1 size with random weights, or the tiny preset."""
    if pretrained:
        return DLoRALGenerator(ModelConfig(preset="sd21", pretrained_path=pretrained)).to(device).eval()
    if full:
        cfg = ModelConfig(preset="sd21")
        return DLoRALGenerator(cfg, components=build_random_sd21(device)).to(device).eval()
    return DLoRALGenerator(ModelConfig(preset="tiny")).to(device).eval()


def variant(base: DLoRALGenerator, *, merged: bool, dtype: torch.dtype, channels_last: bool,
            compile_unet: bool) -> DLoRALGenerator:
    """A copy of ``base`` prepared for inference: fused or not, cast, memory format, compiled."""
    gen = copy.deepcopy(base)
    if merged:
        fuse_families(gen.unet)
    gen.requires_grad_(False).to(dtype)
    if channels_last:
        gen.unet.to(memory_format=torch.channels_last)
        gen.vae.to(memory_format=torch.channels_last)
    if compile_unet:
        gen.unet = torch.compile(gen.unet)
    return gen


def lq_size(name: str, named: dict[str, tuple[int, int]]) -> tuple[int, int]:
    """LQ (height, width) of a size name: a named size, ``N`` (square) or ``HxW``."""
    if name in named:
        return named[name]
    parts = name.lower().split("x")
    if len(parts) in (1, 2) and all(p.isdigit() and int(p) > 0 for p in parts):
        return (int(parts[0]), int(parts[-1]))
    raise SystemExit(f"--sizes {name!r}: use one of {list(named)}, N (square LQ side) or HxW")


def frames_for(hw: tuple[int, int], count: int) -> list[np.ndarray]:
    """``count`` moving LQ frames of size ``hw`` (uint8 RGB)."""
    h, w = hw
    _, lq = synthetic_clip(np.random.default_rng(0), frames=count, size=max(h, w) * 4, scale=4)
    return [np.ascontiguousarray(f[:h, :w]) for f in lq]


def measure(gen: DLoRALGenerator, frames: list[np.ndarray], batch: int,
            device: torch.device, reuse: bool = True) -> tuple[float, dict]:
    """Frames/s over all ``frames`` after a warm-up pass on the first ``batch + 1`` frames."""
    cfg = UpscaleConfig(batch_windows=batch, min_short_side=0, color_fix="adain", device=str(device),
                        reuse_latents=reuse)
    upscaler = Upscaler(gen, cfg)
    for _ in upscaler.upscale_frames(frames[: batch + 1]):
        pass  # warm-up (and compilation)
    with peak_memory(device) as mem:
        synchronize(device)
        start = time.perf_counter()
        produced = sum(1 for _ in upscaler.upscale_frames(frames))
        synchronize(device)
        sec = time.perf_counter() - start
    if produced != len(frames):
        raise RuntimeError(f"{produced} frames produced for {len(frames)} inputs")
    return produced / sec, mem


def inference_regions(gen: DLoRALGenerator) -> list[tuple]:
    """The components of one upscaling call (see ``breakdown.py``)."""
    from dlightning.models.standalone import dloral_frames

    return [(gen, "upsample_lq", "LQ upsample"), (gen, "encode_latents", "VAE encode"),
            (gen, "encode_prompts", "text encoder"), (gen.cfr, "compute_flow", "CFR flow"),
            (gen.cfr, "forward", "CFR"), (gen.unet, "forward", "UNet"), (gen, "decode_latents", "VAE decode"),
            (dloral_frames, "color_fix", "colour fix")]


def profile(gen: DLoRALGenerator, frames: list[np.ndarray], batch: int, device: torch.device) -> str:
    """The per-component breakdown of upscaling ``frames`` once (after a warm-up pass)."""
    cfg = UpscaleConfig(batch_windows=batch, min_short_side=0, color_fix="adain", device=str(device))
    upscaler = Upscaler(gen, cfg)
    for _ in upscaler.upscale_frames(frames[: batch + 1]):
        pass
    bd = profile_call(lambda: sum(1 for _ in upscaler.upscale_frames(frames)), targets=inference_regions(gen),
                      device=device)
    return breakdown_table(bd, f"{len(frames)} frames, windows/call {batch}")


def run(args: argparse.Namespace) -> tuple[list[list], str, list[str]]:
    """Time every setting; returns table rows and the settings note (with ``--profile``'s breakdowns)."""
    device = resolve_device(args.device)
    sizes = FULL_SIZES if args.full else TINY_SIZES
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    rows = []
    names = args.sizes or list(sizes)
    shape = {name: lq_size(name, sizes) for name in names}  # bad names fail before the model is built
    base = base_generator(args.full, device, args.pretrained)
    breakdowns = []
    for name in names:
        frames = frames_for(shape[name], args.frames)
        for merged, batch, comp, cl, reuse in itertools.product(args.merged, args.batches, args.compile,
                                                                args.channels_last, args.reuse_latents):
            if comp and device.type == "cpu" and not args.compile_on_cpu:
                rows.append([name, "yes" if merged else "no", batch, "skipped (cpu)",
                             "on" if cl else "off", "on" if reuse else "off", None, None])
                continue
            gen = variant(base, merged=merged, dtype=dtype, channels_last=cl, compile_unet=comp)
            fps, mem = measure(gen, frames, batch, device, reuse)
            if args.profile:
                label = f"LQ {name}, merged {'yes' if merged else 'no'}: "
                breakdowns.append(label + profile(gen, frames, batch, device))
            rows.append([name, "yes" if merged else "no", batch, "on" if comp else "off",
                         "on" if cl else "off", "on" if reuse else "off", fps, mem["gib"]])
            del gen
            gc.collect()
    shown = ", ".join(f"{n} = LQ {shape[n][1]}x{shape[n][0]}" for n in names)
    mem_kind = ("torch.cuda.max_memory_allocated" if device.type == "cuda"
                else "peak RSS delta, sampled every 5 ms (CPU)")
    model = (f"model folder {args.pretrained}" if args.pretrained
             else "SD 2.1 architecture, random weights" if args.full else "tiny preset")
    note = (f"{model}; dtype "
            f"{str(dtype).replace('torch.', '')}; {args.frames} frames per clip, every frame produced, "
            f"scale 4 (sizes: {shown}); colour fix adain; frames/s after a warm-up "
            f"pass; peak memory: {mem_kind}; "
            "merged = C- and D-LoRA fused (dlightning.export.fuse_families).")
    return rows, note, breakdowns


def main(argv: list[str] | None = None) -> None:
    """Parse flags, run, print and append the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--sizes", nargs="+", default=None,
                        help=f"LQ sizes: named (full: {list(FULL_SIZES)}; otherwise {list(TINY_SIZES)}; "
                             "default all named), N (square) or HxW")
    parser.add_argument("--frames", type=int, default=None, help="frames per clip (default 32 cuda, 8 cpu)")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4], help="windows per UNet call")
    parser.add_argument("--merged", nargs="+", default=["yes", "no"], choices=["yes", "no"])
    parser.add_argument("--compile", nargs="+", default=None, choices=["off", "on"],
                        help="torch.compile of the UNet (default off on + on with cuda, off on cpu)")
    parser.add_argument("--compile-on-cpu", action="store_true", help="do not skip compile rows on CPU")
    parser.add_argument("--channels-last", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--reuse-latents", nargs="+", default=["on"], choices=["on", "off"],
                        help="upscale.reuse_latents: each frame VAE-encoded once (on) or once per window (off, "
                             "the path before it)")
    parser.add_argument("--pretrained", default=None, help="model folder in the diffusers layout "
                        "(model.pretrained_path); benchmarks/model_folder.py writes random-weight ones")
    parser.add_argument("--profile", action="store_true", help="also print the per-component breakdown "
                        "(torch.profiler time, FLOPs) of each setting")
    parser.add_argument("--dtype", default=None, choices=list(DTYPES), help="default bf16 cuda, fp32 cpu")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.frames = args.frames or (32 if cuda else 8)
    args.merged = [m == "yes" for m in args.merged]
    args.compile = [c == "on" for c in (args.compile or (["off", "on"] if cuda else ["off"]))]
    args.channels_last = [c == "on" for c in args.channels_last]
    args.reuse_latents = [r == "on" for r in args.reuse_latents]
    rows, note, breakdowns = run(args)
    columns = ["LQ size", "merged LoRA", "windows/call", "compile", "channels-last", "reuse latents", "frames/s",
               "peak mem GiB"]
    text = header("bench_inference", resolve_device(args.device), note) + "\n" + markdown_table(columns, rows)
    if breakdowns:
        text += "\nPer-component breakdown:\n\n" + "\n".join(breakdowns)
    emit(text, args)


if __name__ == "__main__":
    main()
