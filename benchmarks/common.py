"""Shared helpers of the benchmark scripts: run header, tables, results file, timing, memory, FLOPs.

Every benchmark prints a markdown table and appends it, under a header naming the machine, the
device, the library versions and the date, to ``benchmarks/RESULTS.md`` (or to ``--results PATH``,
or to ``$DLIGHTNING_BENCH_RESULTS``; ``--no-append`` writes nothing).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

RESULTS_ENV = "DLIGHTNING_BENCH_RESULTS"
DEFAULT_RESULTS = Path(__file__).with_name("RESULTS.md")

PEAK_TFLOPS = {
    # dense tensor-core peak, bf16 == fp16 (NVIDIA data sheets); tf32 is half of it
    "H100 SXM": 989.0,
    "H100 80GB HBM3": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H200": 989.0,
    "A100": 312.0,
}
"""Peak dense bf16/fp16 TFLOPS by (a substring of) ``torch.cuda.get_device_name()``."""


# ------------------------------------------------------------------------------------------ CLI
def add_common_args(parser: argparse.ArgumentParser) -> None:
    """``--device``, ``--full``, ``--results`` and ``--no-append``, shared by every benchmark."""
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--full", action="store_true",
                        help="full size: SD 2.1 architecture with random weights, 512x512 clips (GPU)")
    parser.add_argument("--results", default=None,
                        help=f"markdown file to append to (default ${RESULTS_ENV} or benchmarks/RESULTS.md)")
    parser.add_argument("--no-append", action="store_true", help="print only, write no results file")


def resolve_device(name: str) -> torch.device:
    """The benchmark device; ``cuda`` without a GPU is an error that says what to do."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda given but no CUDA device is visible; run with --device cpu")
    return device


def results_path(arg: str | None) -> Path:
    """``--results`` if given, else ``$DLIGHTNING_BENCH_RESULTS``, else ``benchmarks/RESULTS.md``."""
    return Path(arg or os.environ.get(RESULTS_ENV) or DEFAULT_RESULTS)


# ------------------------------------------------------------------------------------------ report
def device_name(device: torch.device) -> str:
    """Human-readable name of the device (GPU model, or CPU model and core count)."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass  # not Linux: keep platform.processor()
    return f"CPU {cpu}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}"


def versions() -> str:
    """Versions of python and the libraries the benchmarks exercise."""
    parts = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    for name in ("diffusers", "peft", "lightning"):
        try:
            mod = __import__(name)
            parts.append(f"{name} {mod.__version__}")
        except ImportError:
            continue
    return ", ".join(parts)


def header(title: str, device: torch.device, settings: str) -> str:
    """Section header: title and date, then device, versions and the settings of the run."""
    return (f"### {title} ({datetime.date.today().isoformat()})\n\n"
            f"device: {device_name(device)}; host {platform.node()}; {versions()}\n\n"
            f"{settings}\n")


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; floats printed with 3 significant digits, None as ``n/a``."""
    def fmt(v: Any) -> str:
        if v is None:
            return "n/a"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def emit(text: str, args: argparse.Namespace) -> Path | None:
    """Print ``text`` and append it to the results file unless ``--no-append``; returns the file."""
    print(text, flush=True)
    if args.no_append:
        return None
    path = results_path(args.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write("\n" + text)
    return path


# ------------------------------------------------------------------------------------------ measuring
def synchronize(device: torch.device) -> None:
    """Wait for queued device work (CUDA kernels are asynchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], *, warmup: int, repeats: int, device: torch.device) -> float:
    """Mean seconds per call of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / max(repeats, 1)


class _RssSampler:
    """Samples the process RSS every few ms in a thread: a CPU stand-in for a peak-memory counter."""

    def __init__(self, interval: float = 0.005) -> None:
        import psutil

        self._proc = psutil.Process()
        self._interval = interval
        self.baseline = self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self._interval)

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


@contextmanager
def peak_memory(device: torch.device):
    """Yield a dict whose ``gib`` is set on exit to the peak memory of the block.

    CUDA: ``torch.cuda.max_memory_allocated`` (reset on entry). CPU: peak RSS minus RSS on entry,
    sampled every 5 ms (``kind`` says which).
    """
    out: dict[str, Any] = {"gib": None, "kind": ""}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield out
        synchronize(device)
        out["gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["delta_gib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**30
        out["kind"] = "torch.cuda.max_memory_allocated"
    else:
        with _RssSampler() as sampler:
            yield out
        out["gib"] = (sampler.peak - sampler.baseline) / 2**30
        out["kind"] = "peak RSS delta (sampled)"


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls,
    convolutions, attention; forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def peak_tflops(device: torch.device) -> float | None:
    """Peak dense bf16/fp16 TFLOPS of a known GPU; None on CPU or an unknown GPU (MFU then n/a)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value
    if "H100" in name:
        return PEAK_TFLOPS["H100 SXM"]
    return None


def mfu(flops_per_call: int | None, seconds_per_call: float, device: torch.device) -> float | None:
    """Model-FLOPs utilisation in percent, None where the peak is unknown (CPU)."""
    peak = peak_tflops(device)
    if peak is None or not flops_per_call or seconds_per_call <= 0:
        return None
    return 100.0 * flops_per_call / seconds_per_call / (peak * 1e12)


def autocast(device: torch.device, precision: str):
    """Autocast context for ``fp32`` (disabled), ``bf16`` or ``fp16``."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device.type, dtype=dtype, enabled=precision != "fp32")


# ------------------------------------------------------------------------------------------ models
def build_random_sd21(device: torch.device | str = "cpu", seed: int = 0):
    """Stable Diffusion 2.1 base components at full size with RANDOM weights (no download).

    Built from ``dlightning.models.components.SD21_*_CONFIG`` directly on ``device`` (initialising
    865 M UNet parameters on a GPU takes seconds, on a CPU minutes). The tokenizer is the tiny
    byte-level one (its ids are valid in the 49 408-token vocabulary); text content does not matter
    for timing.

    Returns:
        ``dlightning.models.components.Components`` in fp32, eval mode.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dlightning.models.components import (
        SD21_TEXT_CONFIG,
        SD21_UNET_CONFIG,
        SD21_VAE_CONFIG,
        Components,
    )
    from dlightning.models.tiny import SD21_SCHEDULER_CONFIG, tiny_tokenizer

    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**SD21_UNET_CONFIG).eval()
        vae = AutoencoderKL(**SD21_VAE_CONFIG).eval()
        text = CLIPTextModel(CLIPTextConfig(**SD21_TEXT_CONFIG)).eval()
    scheduler = DDPMScheduler(**SD21_SCHEDULER_CONFIG)
    return Components(unet=unet, vae=vae, text_encoder=text, tokenizer=tiny_tokenizer(),
                      noise_scheduler=scheduler,
                      alphas_cumprod=scheduler.alphas_cumprod.detach().float().clone())


def random_unet(full: bool, device: torch.device | str = "cpu", seed: int = 0):
    """A pristine 4-channel UNet (the reference's separate CSD teacher copy), tiny or SD 2.1 size."""
    from diffusers import UNet2DConditionModel

    from dlightning.models.components import SD21_UNET_CONFIG
    from dlightning.models.tiny import TINY_UNET_CONFIG

    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        return UNet2DConditionModel(**(SD21_UNET_CONFIG if full else TINY_UNET_CONFIG)).eval()
