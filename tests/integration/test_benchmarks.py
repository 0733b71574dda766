"""Smoke tests of the benchmark commands at tiny size on CPU.

Each command runs with its smallest flags, prints a markdown table and appends it to a results file
in ``tmp_path`` (never to benchmarks/RESULTS.md). Figures are not checked: timing is never tested.
"""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
from helpers.paths import BENCHMARKS as BENCH


def _bench(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


def _rows(text: str) -> list[list[str]]:
    """Body rows of the markdown tables in ``text`` (header and separator rows dropped)."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    body = [ln for i, ln in enumerate(lines) if not set(ln) <= set("|-") and
            not (i + 1 < len(lines) and set(lines[i + 1]) <= set("|-"))]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in body]


def test_common_table_and_flops(tmp_path):
    import torch

    common = _bench("common")
    table = common.markdown_table(["a", "b"], [[1.23456, None], ["x", 12345.6]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1.23 | n/a |", "| x | 12346 |"]
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    assert common.count_flops(lambda: a @ b) == 2 * 8 * 16 * 4  # multiply-adds counted as 2 FLOPs
    assert common.mfu(10**12, 1.0, torch.device("cpu")) is None


def test_train_step_smoke(tmp_path, capsys):
    out = tmp_path / "results.md"
    _bench("bench_train_step").main(["--size", "32", "--phases", "detail", "--precisions", "fp32",
                                     "--checkpointing", "off", "--warmup", "0", "--steps", "1",
                                     "--profile", "--results", str(out)])
    printed = capsys.readouterr().out
    text = out.read_text()
    rows = _rows(text[: text.index("Per-component breakdown")])
    assert "bench_train_step" in printed and text.strip() in printed.strip()
    assert [r[3] for r in rows] == ["dlightning", "reference"]
    ours = rows[0]
    assert float(ours[4]) > 0 and float(ours[7]) > 0 and ours[8] == "n/a"  # clips/s, GFLOP, MFU on CPU
    assert float(ours[9]) > 0  # speed-up measured against the reference row
    breakdown = printed[printed.index("Per-component breakdown"):]
    for part in ("UNet", "VAE decode", "LPIPS", "CSD teacher (UNet)", "optimizer"):
        assert f"| {part} |" in breakdown, part


def test_breakdown_charges_work_to_its_region():
    """FLOPs per region against the hand count; a backward is charged to the region of its forward."""
    import torch

    bd = _bench("breakdown")

    class Two(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(16, 32, bias=False), torch.nn.Linear(32, 8, bias=False)

        def first(self, x):
            return self.a(x)

        def second(self, h):
            return self.b(h)

    m, x = Two(), torch.randn(4, 16)
    result = bd.profile_call(lambda: m.second(m.first(x)).sum().backward(),
                             targets=[(m, "first", "A"), (m, "second", "B")], calls=2)
    per_call = {k: v // 2 for k, v in result.flops.items()}
    assert per_call[("A", "forward")] == 2 * 4 * 16 * 32
    assert per_call[("B", "forward")] == 2 * 4 * 32 * 8
    assert per_call[("B", "backward")] == 2 * (2 * 4 * 32 * 8)  # grad of the input and of the weight
    assert per_call[("A", "backward")] == 2 * 4 * 16 * 32  # x needs no grad: the weight's only
    assert result.seconds[("A", "forward")] > 0 and result.seconds[("B", "backward")] > 0
    assert "first" not in vars(m)  # the wrapping is undone


def test_inference_smoke(tmp_path, capsys):
    out = tmp_path / "results.md"
    _bench("bench_inference").main(["--sizes", "16", "--frames", "2", "--batches", "1", "--merged", "yes",
                                    "no", "--channels-last", "off", "--results", str(out)])
    rows = _rows(out.read_text())
    assert [r[1] for r in rows] == ["yes", "no"]
    assert all(float(r[6]) > 0 for r in rows)
    assert "bench_inference" in capsys.readouterr().out


def test_inference_from_a_model_folder_with_breakdown(tmp_path, capsys):
    from dlightning.models.tiny import save_tiny_pretrained

    folder = save_tiny_pretrained(tmp_path / "model")
    out = tmp_path / "results.md"
    _bench("bench_inference").main(["--pretrained", str(folder), "--sizes", "16", "--frames", "2", "--batches", "1",
                                    "--merged", "yes", "--channels-last", "off", "--profile", "--results", str(out)])
    text = out.read_text()
    assert f"model folder {folder}" in text
    breakdown = text[text.index("Per-component breakdown"):]
    for part in ("VAE encode", "UNet", "CFR", "VAE decode", "colour fix"):
        assert f"| {part} | forward |" in breakdown, part
    assert "| backward |" not in breakdown  # inference builds no graph
    capsys.readouterr()


def test_data_smoke(tmp_path):
    out = tmp_path / "results.md"
    _bench("bench_data").main(["--quick", "--results", str(out)])
    text = out.read_text()
    assert "bench_loader" in text and "data_prep degradation" in text


def test_comm_hook_counts_only_trainable_bytes(monkeypatch):
    import torch
    import torch.distributed as dist
    from torch import nn

    bench = _bench("bench_distributed")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(bench._free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
        model[0].requires_grad_(False)  # frozen: must not be all-reduced
        ddp = nn.parallel.DistributedDataParallel(model)
        state = {"bytes": 0, "buckets": 0}
        ddp.register_comm_hook(state, bench._counting_allreduce)
        ddp(torch.randn(3, 8)).sum().backward()
    finally:
        dist.destroy_process_group()
    assert state["bytes"] == (16 * 4 + 4) * 4  # second Linear only, fp32


@pytest.mark.slow
def test_distributed_smoke(tmp_path):
    out = tmp_path / "results.md"
    cmd = [sys.executable, str(BENCH / "bench_distributed.py"), "--worlds", "1", "--steps", "1",
           "--warmup", "0", "--results", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = _rows(out.read_text())
    traffic = {(r[0], r[1]): float(r[2]) for r in rows if len(r) == 3}
    measured = {k.split(",")[1].strip(): v for (m, k), v in traffic.items() if k.startswith("measured")}
    # DDP's default all-reduces exactly the trainable tensors: nothing frozen travels
    assert measured["grad_sync=all (DDP default)"] == pytest.approx(
        traffic["dlightning, tiny", "analytic (trainable tensors)"], rel=1e-2)
    # the phase-aware hook sends the consistency groups only, bf16 half of that
    assert measured["grad_sync=active (default)"] < measured["grad_sync=all (DDP default)"]
    assert measured["grad_sync=active + bf16"] == pytest.approx(measured["grad_sync=active (default)"] / 2)
    assert "bench_distributed" in proc.stdout


@pytest.mark.slow
def test_distributed_two_processes(tmp_path):
    out = tmp_path / "results.md"
    cmd = [sys.executable, str(BENCH / "bench_distributed.py"), "--steps", "1", "--warmup", "0",
           "--results", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "measured, grad_sync=active (default), 2 rank(s)" in out.read_text()
