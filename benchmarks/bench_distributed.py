"""Gradient traffic per optimizer step, and step time with 1 vs 2 DDP processes (CPU, gloo, tiny model).

    python benchmarks/bench_distributed.py [--steps 3] [--size 32]

Bytes all-reduced per step, three ways:

* analytic: sum of ``numel * element_size`` of every trainable tensor (what DDP registers; the
  frozen VAE, text encoder, SPyNet and base UNet require no grad and are not DDP parameters), for
  the tiny preset and for SD 2.1 size (``dlightning.models.inspect`` on the meta device);
* measured, on a real gloo run of ``DLoRALModule.compute_losses`` + backward, for each
  ``trainer.grad_sync`` mode: ``all`` (DDP's default: every bucket, counted by a hook that all-reduces
  like the default), ``active`` (the training default: the phase-aware hook of
  ``dlightning.training.grad_sync``, only the phase's groups) and ``active`` with bf16 communication;
* the reference's lower bound: the phase's groups plus the VAE, whose ~84 M parameters require grad
  there (docs/METHOD.md 1.1) and are all-reduced every step.

Step time: each process trains on its own clip (weak scaling); efficiency = t(1 process) / t(2).
On a shared 2-core CPU this shows the mechanics, not cluster scaling.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_common_args, emit, header, markdown_table, resolve_device  # noqa: E402


class LossOf(nn.Module):
    """Puts ``compute_losses`` behind ``forward`` so DDP's reducer sees the step."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.inner = module

    def forward(self, batch: dict, spec) -> torch.Tensor:
        return self.inner.compute_losses(batch, spec)["loss"]


def _counting_allreduce(state: dict, bucket):  # no annotations: DDP checks them literally
    """All-reduce (mean) one bucket and count its bytes."""
    buf = bucket.buffer()
    state["bytes"] += buf.numel() * buf.element_size()
    state["buckets"] += 1
    buf.div_(dist.get_world_size())
    return dist.all_reduce(buf, async_op=True).get_future().then(lambda fut: fut.value()[0])


def _worker(rank: int, world: int, port: int, args: dict, out: str) -> None:
    from bench_train_step import WEIGHTS, make_batch, root_config

    from dlightning.train import build_module
    from dlightning.training.grad_sync import PhaseGradSync, active_allreduce_hook
    from dlightning.training.optim import build_optimizer, clip_group_norms, drop_inactive_gradients
    from dlightning.training.schedule import PhaseSpec

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        module = build_module(root_config(False)).train()
        ddp = nn.parallel.DistributedDataParallel(LossOf(module))
        phase = args["phase"]
        if args["sync"] == "all":
            state = {"bytes": 0, "buckets": 0}
            ddp.register_comm_hook(state, _counting_allreduce)
        else:
            sync = PhaseGradSync("bf16" if args["sync"] == "active_bf16" else "fp32")
            sync.bind(module.generator.parameter_groups())
            sync.set_phase(phase)
            ddp.register_comm_hook(sync, active_allreduce_hook)
        opt = build_optimizer(module.generator.parameter_groups(), module.optim_cfg)
        batch = make_batch(batch_size=1, size=args["size"], scale=4, device=torch.device("cpu"))
        spec = PhaseSpec(phase=phase, weights=WEIGHTS[phase], segment=0, progress=1.0)

        def step() -> None:
            ddp(batch, spec).backward()
            drop_inactive_gradients(opt, phase)
            clip_group_norms(opt, module.optim_cfg.clip_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(args["warmup"]):
            step()
        sent_before = state["bytes"] if args["sync"] == "all" else sync.bytes_reduced
        dist.barrier()
        start = time.perf_counter()
        for _ in range(args["steps"]):
            step()
        dist.barrier()
        sec = (time.perf_counter() - start) / args["steps"]
        ddp_bytes = sum(p.numel() * p.element_size() for p in ddp.parameters() if p.requires_grad)
        sent = (state["bytes"] if args["sync"] == "all" else sync.bytes_reduced) - sent_before
        if rank == 0:
            Path(out).write_text(json.dumps({"sec": sec, "hook_bytes": sent / args["steps"],
                                             "ddp_param_bytes": ddp_bytes}))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ddp(world: int, args: argparse.Namespace, sync: str = "active") -> dict:
    """Spawn ``world`` gloo processes; returns rank 0's timing and all-reduced bytes per step."""
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rank0.json")
        cfg = {"size": args.size, "steps": args.steps, "warmup": args.warmup, "phase": args.phase,
               "sync": sync}
        mp.spawn(_worker, args=(world, _free_port(), cfg, out), nprocs=world, join=True)
        return json.loads(Path(out).read_text())


def analytic_bytes() -> dict[str, float]:
    """Trainable bytes (fp32 grads) for tiny and SD 2.1 size, and the reference's lower bounds."""
    from diffusers import AutoencoderKL

    from dlightning.models.components import SD21_VAE_CONFIG
    from dlightning.models.config import ModelConfig
    from dlightning.models.inspect import inspect_model

    out = {}
    for preset in ("tiny", "sd21_meta"):
        rep = inspect_model(ModelConfig(preset=preset))
        fam = rep["families"]
        out[f"{preset}_ours"] = 4.0 * rep["trainable_total"]
        consistency = fam["consistency"] + rep["conv_in"] + rep["cfr_cross_attention"]
        out[f"{preset}_ref_consistency"] = 4.0 * consistency
        out[f"{preset}_ref_detail"] = 4.0 * (fam["detail"] + rep["conv_in"])
        out[f"{preset}_active_consistency"] = out[f"{preset}_ref_consistency"]  # the same groups
        out[f"{preset}_active_detail"] = out[f"{preset}_ref_detail"]
    with torch.device("meta"):
        vae = AutoencoderKL(**SD21_VAE_CONFIG)
    out["sd21_vae"] = 4.0 * sum(p.numel() for p in vae.parameters())
    return out


def main(argv: list[str] | None = None) -> None:
    """Run 1- and 2-process DDP, print and append the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--size", type=int, default=32, help="HR side of the tiny clips")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--phase", default="consistency", choices=["consistency", "detail"])
    parser.add_argument("--worlds", nargs="+", type=int, default=[1, 2], help="process counts to run")
    args = parser.parse_args(argv)
    if args.full or args.device != "cpu":
        print("bench_distributed runs on CPU with the tiny model; the SD 2.1 figures are analytic",
              file=sys.stderr)
    device = resolve_device("cpu")
    runs = {w: run_ddp(w, args) for w in sorted(set(args.worlds))}
    big = runs[max(runs)]
    modes = {"all": run_ddp(max(runs), args, "all"), "active": big,
             "active_bf16": run_ddp(max(runs), args, "active_bf16")}
    a = analytic_bytes()
    mb = 1e6
    n = max(runs)
    active_key = f"sd21_meta_active_{args.phase}"
    traffic = [
        ["dlightning, tiny", "analytic (trainable tensors)", a["tiny_ours"] / mb],
        ["dlightning, tiny", "DDP parameters requiring grad", big["ddp_param_bytes"] / mb],
        ["dlightning, tiny", f"measured, grad_sync=all (DDP default), {n} rank(s)", modes["all"]["hook_bytes"] / mb],
        ["dlightning, tiny", f"measured, grad_sync=active (default), {n} rank(s)", big["hook_bytes"] / mb],
        ["dlightning, tiny", f"measured, grad_sync=active + bf16, {n} rank(s)",
         modes["active_bf16"]["hook_bytes"] / mb],
        ["dlightning, SD 2.1", "analytic, grad_sync=all (trainable tensors)", a["sd21_meta_ours"] / mb],
        ["dlightning, SD 2.1", f"analytic, grad_sync=active, {args.phase} groups", a[active_key] / mb],
        ["dlightning, SD 2.1", f"analytic, grad_sync=active + bf16, {args.phase} groups", a[active_key] / 2 / mb],
        ["reference, SD 2.1, consistency", "lower bound: C-LoRA + CFR + conv_in + VAE",
         (a["sd21_meta_ref_consistency"] + a["sd21_vae"]) / mb],
        ["reference, SD 2.1, detail", "lower bound: D-LoRA + conv_in + VAE",
         (a["sd21_meta_ref_detail"] + a["sd21_vae"]) / mb],
    ]
    t1 = runs[1]["sec"] if 1 in runs else None
    timing = [[w, r["sec"] * 1000, w / r["sec"], 100.0 * t1 / r["sec"] if t1 and w > 1 else None]
              for w, r in runs.items()]
    note = (f"tiny preset, {args.phase} phase, 3-frame {args.size}x{args.size} clip per rank, gloo on CPU, "
            f"torch threads 1 per process, {args.warmup} warm-up + {args.steps} timed steps; "
            "fp32 gradients (4 bytes per element) unless bf16 is named; the timing rows use grad_sync=active.")
    text = (header("bench_distributed", device, note) + "\n"
            + markdown_table(["model", "how", "MB all-reduced per step"], traffic) + "\n"
            + markdown_table(["processes", "ms/step", "clips/s (all ranks)", "weak-scaling efficiency %"],
                             timing))
    emit(text, args)


if __name__ == "__main__":
    main()
