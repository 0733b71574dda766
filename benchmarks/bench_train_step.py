"""Training-step throughput of dlightning vs the reference step, side by side in one process.

    python benchmarks/bench_train_step.py                      # CPU smoke: tiny preset, 64x64 HR
    python benchmarks/bench_train_step.py --device cuda --full # SD 2.1 size (random weights), 512x512

One optimizer step = forward of both windows of a 3-frame clip, losses (MSE, LPIPS, temporal, CSD in
the detail phase), backward, per-group clipping and the AdamW step. Ours is
``DLoRALModule.compute_losses`` plus the library's optimizer helpers, driven by a manual loop (no
Trainer, so no logging or checkpoint cost is timed); the reference is ``reference_step.py``. For
every precision x checkpointing setting both are built, timed on the same batch one after the
other, and freed; the table reports clips/s, peak memory, FLOPs per step (FlopCounterMode, counted
once per implementation and phase), MFU on known GPUs, and the speed-up ours / reference.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from breakdown import breakdown_table, profile_call, training_regions  # noqa: E402
from common import (  # noqa: E402
    add_common_args,
    autocast,
    build_random_sd21,
    count_flops,
    emit,
    header,
    markdown_table,
    mfu,
    peak_memory,
    random_unet,
    resolve_device,
    time_calls,
)
from reference_step import build_reference_step  # noqa: E402

from dlightning.config import load_config  # noqa: E402
from dlightning.data.synthetic import synthetic_clip  # noqa: E402
from dlightning.data.transforms import to_tensor  # noqa: E402
from dlightning.models.components import load_components  # noqa: E402
from dlightning.models.generator import DLoRALGenerator  # noqa: E402
from dlightning.train import build_module  # noqa: E402
from dlightning.training.optim import build_optimizer, clip_group_norms, drop_inactive_gradients  # noqa: E402
from dlightning.training.schedule import PhaseSpec  # noqa: E402

WEIGHTS = {
    "consistency": {"l2": 1.0, "lpips": 2.0, "csd": 0.0, "temporal": 1.0},
    "detail": {"l2": 1.0, "lpips": 2.0, "csd": 1.0, "temporal": 1.0},
}
"""Loss weights per phase (the default schedule's plateau values)."""


def make_batch(*, batch_size: int, size: int, scale: int, device: torch.device, frames: int = 3) -> dict:
    """A loader-shaped batch of ``frames``-frame synthetic clips in [-1, 1] on ``device``."""
    rng = np.random.default_rng(0)
    clips = [synthetic_clip(rng, frames=frames, size=size, scale=scale) for _ in range(batch_size)]
    return {"hr": torch.stack([to_tensor(hr) for hr, _ in clips]).to(device),
            "lq": torch.stack([to_tensor(lq) for _, lq in clips]).to(device),
            "caption": ["a street with cars and trees, high quality"] * batch_size,
            "kind": ["video"] * batch_size, "key": [f"bench_{i}" for i in range(batch_size)]}


def root_config(gradient_checkpointing: bool, *, pretrained: str | None = None, temporal: bool = True,
                overrides: list[str] | None = None):
    """Config of our module: a model folder (``model.pretrained_path``) or the tiny preset (the full-size
    generator is swapped in at ``--full``), random LPIPS/SPyNet; the temporal loss on or off."""
    model = ["model.preset=sd21", f"model.pretrained_path={pretrained}"] if pretrained else ["model.preset=tiny"]
    return load_config(overrides=[
        *model,
        f"model.gradient_checkpointing={str(gradient_checkpointing).lower()}",
        "loss.lpips.allow_random_backbone=true",
        "loss.temporal.flow_net=spynet",
        *([] if temporal else ["loss.temporal.mode=none"]),
        "trainer.accelerator=cpu",
        *(overrides or []),
    ])


class OurStep:
    """dlightning's step: ``compute_losses`` + drop inactive grads + per-group clip + AdamW."""

    def __init__(self, cfg, *, full: bool, precision: str, device: torch.device) -> None:
        self.module = build_module(cfg)
        if full:
            model_cfg = cfg.model
            model_cfg.preset = "sd21"
            self.module.generator = DLoRALGenerator(model_cfg, components=build_random_sd21(device))
        self.module.to(device).train()
        if precision != "fp32":
            self.module.generator.cast_frozen(torch.bfloat16 if precision == "bf16" else torch.float16)
        self.optimizer = build_optimizer(self.module.generator.parameter_groups(), cfg.optim)
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        self.precision, self.device = precision, device

    def step(self, batch: dict, phase: str, weights: dict[str, float]) -> float:
        spec = PhaseSpec(phase=phase, weights=weights, segment=0, progress=1.0)
        with autocast(self.device, self.precision):
            loss = self.module.compute_losses(batch, spec)["loss"]
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        self._optimizer_step(phase)
        return float(loss.detach())

    def _optimizer_step(self, phase: str) -> None:
        """Unscale, drop the inactive groups' gradients, clip per group, step, zero."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        drop_inactive_gradients(self.optimizer, phase)
        clip_group_norms(self.optimizer, self.module.optim_cfg.clip_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def build_step(impl: str, *, full: bool, precision: str, ckpt: bool, device: torch.device, lpips,
               empty_cache: bool, pretrained: str | None = None, temporal: bool = True):
    """Our step or the reference step, built fresh on ``device``."""
    cfg = root_config(ckpt, pretrained=pretrained, temporal=temporal)
    if impl == "dlightning":
        return OurStep(cfg, full=full and not pretrained, precision=precision, device=device)
    model_cfg = cfg.model
    if full and not pretrained:
        model_cfg.preset = "sd21"
    comps = build_random_sd21(device) if full and not pretrained else None
    teacher = (load_components(model_cfg, ("unet",)).unet.to(device).eval() if pretrained
               else random_unet(full, device, seed=1))
    return build_reference_step(model_cfg, components=comps, teacher_unet=teacher,
                                lpips=lpips, csd_cfg=cfg.loss.csd, precision=precision, device=device,
                                empty_cache=empty_cache)


def free(obj) -> None:
    """Drop a model and give its memory back before the next one is built."""
    del obj
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run(args: argparse.Namespace) -> tuple[list[list], str, list[str]]:
    """Time every (precision, checkpointing, phase, implementation); returns table rows, a note and the
    breakdown tables (``--profile``)."""
    from dlightning.losses import build_lpips
    from dlightning.losses.config import LPIPSConfig

    device = resolve_device(args.device)
    size = args.size or (512 if args.full else 64)
    batch = make_batch(batch_size=args.batch_size, size=size, scale=4, device=device, frames=args.frames)
    lpips = build_lpips(LPIPSConfig(allow_random_backbone=True)).to(device)
    weights = {p: {**w, "temporal": 0.0 if args.no_temporal else w["temporal"]} for p, w in WEIGHTS.items()}
    flops: dict[tuple[str, str], int] = {}
    rows, times, breakdowns = [], {}, []
    for precision in args.precisions:
        for ckpt in sorted(args.checkpointing):  # off first, so FLOPs exclude recomputation
            for impl in args.impls:
                torch.manual_seed(0)
                stepper = build_step(impl, full=args.full, precision=precision, ckpt=ckpt, device=device,
                                     lpips=lpips, empty_cache=not args.ref_keep_cache,
                                     pretrained=args.pretrained, temporal=not args.no_temporal)
                for phase in args.phases:
                    def one(s=stepper, p=phase):
                        return s.step(batch, p, weights[p])
                    if args.profile and impl == "dlightning":
                        one()  # warm-up outside the profiler
                        bd = profile_call(one, targets=[*training_regions(stepper.module),
                                                        (stepper, "_optimizer_step", "optimizer")],
                                          calls=args.steps, device=device)
                        breakdowns.append(breakdown_table(
                            bd, f"{phase} phase, {precision}, grad ckpt {'on' if ckpt else 'off'}"))
                    if (impl, phase) not in flops and not args.no_flops:
                        flops[impl, phase] = count_flops(one)
                    with peak_memory(device) as mem:
                        sec = time_calls(one, warmup=args.warmup, repeats=args.steps, device=device)
                    times[precision, ckpt, phase, impl] = sec
                    f = flops.get((impl, phase))
                    rows.append([phase, precision, "on" if ckpt else "off", impl,
                                 args.batch_size / sec, sec * 1000, mem["gib"],
                                 None if f is None else f / 1e9, mfu(f, sec, device), None])
                free(stepper)
    for row in rows:  # speed-up = reference time / our time, same settings, measured in this run
        if row[3] == "dlightning":
            ref = times.get((row[1], row[2] == "on", row[0], "reference"))
            row[9] = ref / times[row[1], row[2] == "on", row[0], "dlightning"] if ref else None
    mem_kind = ("torch.cuda.max_memory_allocated (only that implementation resident)" if device.type == "cuda"
                else "peak RSS delta over the timed steps, sampled every 5 ms (CPU)")
    model = (f"model folder {args.pretrained}" if args.pretrained
             else "SD 2.1 architecture, random weights" if args.full else "tiny preset")
    note = (f"clip: {args.frames} frames, HR {size}x{size}, LQ {size // 4}x{size // 4}, batch {args.batch_size}; "
            f"{model}; temporal loss {'off' if args.no_temporal else 'on'}; "
            f"{args.warmup} warm-up + {args.steps} timed steps per row; peak memory: {mem_kind}; "
            "FLOPs: FlopCounterMode over one step (forward + backward), counted on the first setting "
            "(checkpointing off when timed); MFU = FLOPs/s / peak dense bf16 FLOPS of the GPU (n/a on CPU); "
            "speed-up = reference s/step / dlightning s/step at the same settings.")
    return rows, note, breakdowns


def main(argv: list[str] | None = None) -> None:
    """Parse flags, run, print and append the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--size", type=int, default=0, help="HR side (default 512 full, 64 otherwise)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--phases", nargs="+", default=["consistency", "detail"],
                        choices=["consistency", "detail"])
    parser.add_argument("--precisions", nargs="+", default=None, choices=["fp32", "bf16", "fp16"],
                        help="default: bf16 fp16 on cuda, fp32 bf16 on cpu")
    parser.add_argument("--checkpointing", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default 2 cuda, 1 cpu)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10 cuda, 3 cpu)")
    parser.add_argument("--no-flops", action="store_true", help="skip FLOP counting (and MFU)")
    parser.add_argument("--pretrained", default=None, help="model folder in the diffusers layout "
                        "(model.pretrained_path); benchmarks/model_folder.py writes random-weight ones")
    parser.add_argument("--frames", type=int, default=3, help="frames per clip (default 3)")
    parser.add_argument("--no-temporal", action="store_true", help="temporal loss off (equal work with the "
                        "reference, which has no differentiable temporal loss)")
    parser.add_argument("--impls", nargs="+", default=["dlightning", "reference"],
                        choices=["dlightning", "reference"])
    parser.add_argument("--profile", action="store_true", help="also print the per-component breakdown "
                        "(torch.profiler time, FLOPs) of our step, per phase")
    parser.add_argument("--ref-keep-cache", action="store_true",
                        help="reference without its per-step gc.collect() + empty_cache()")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.precisions = args.precisions or (["bf16", "fp16"] if cuda else ["fp32", "bf16"])
    args.checkpointing = [c == "on" for c in args.checkpointing]
    args.warmup = args.warmup if args.warmup is not None else (2 if cuda else 1)
    args.steps = args.steps if args.steps is not None else (10 if cuda else 3)
    rows, note, breakdowns = run(args)
    columns = ["phase", "precision", "grad ckpt", "impl", "clips/s", "ms/step", "peak mem GiB",
               "GFLOP/step", "MFU %", "speed-up vs ref"]
    text = header("bench_train_step", resolve_device(args.device), note)
    text += "\n" + markdown_table(columns, rows)
    if breakdowns:
        text += "\nPer-component breakdown of dlightning's step:\n\n" + "\n".join(breakdowns)
    emit(text, args)


if __name__ == "__main__":
    main()
