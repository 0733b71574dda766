"""The phase-aware DDP hook, with 2 real gloo processes: active gradients are the exact cross-rank mean,
inactive ones stay local, and only the active bytes travel."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dlightning.training.grad_sync import PhaseGradSync, active_allreduce_hook

WORLD = 2


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c, self.d, self.shared = nn.Linear(6, 5), nn.Linear(5, 3), nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared(self.d(self.c(x))).pow(2).sum()


def _toy() -> _Toy:
    torch.manual_seed(0)
    return _Toy()


def _data(rank: int) -> torch.Tensor:
    return torch.randn(4, 6, generator=torch.Generator().manual_seed(100 + rank))


def _local_grads(rank: int) -> dict[str, torch.Tensor]:
    model = _toy()
    model(_data(rank)).backward()
    return {k: p.grad.clone() for k, p in model.named_parameters()}


def _worker(rank: int, port: int, phase: str | None, comm_dtype: str, bucket_mb: float, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        model = _toy()
        ddp = DistributedDataParallel(model, bucket_cap_mb=bucket_mb)
        state = PhaseGradSync(comm_dtype)
        ddp.register_comm_hook(state, active_allreduce_hook)
        if phase is not None:
            state.bind({"c_lora": model.c.parameters(), "d_lora": model.d.parameters(),
                        "conv_in": model.shared.parameters()})
            state.set_phase(phase)
        ddp(_data(rank)).backward()
        out[rank] = ({k: p.grad.clone() for k, p in model.named_parameters()}, state.bytes_reduced)
    finally:
        dist.destroy_process_group()


def _run(phase: str | None, comm_dtype: str = "fp32", bucket_mb: float = 25.0) -> dict:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(port, phase, comm_dtype, bucket_mb, out), nprocs=WORLD, join=True)
    return dict(out)


@pytest.fixture(scope="module")
def local() -> list[dict[str, torch.Tensor]]:
    return [_local_grads(r) for r in range(WORLD)]


# 25 MB: one bucket mixing both families; 0.0001 MB: one tensor per bucket, some with nothing to send
@pytest.mark.parametrize(("phase", "synced_prefixes", "bucket_mb"), [
    ("consistency", ("c.", "shared."), 25.0),   # C-LoRA and conv_in train; D-LoRA's gradients are dropped
    ("detail", ("d.", "shared."), 0.0001),
    (None, ("c.", "d.", "shared."), 25.0),      # not bound yet: everything, like DDP's default hook
])
def test_active_gradients_are_the_mean_others_stay_local(local, phase, synced_prefixes, bucket_mb):
    out = _run(phase, bucket_mb=bucket_mb)
    for rank in range(WORLD):
        grads, sent = out[rank]
        for name, grad in grads.items():
            if name.startswith(synced_prefixes):
                mean = (local[0][name] + local[1][name]) / WORLD
                torch.testing.assert_close(grad, mean, rtol=0, atol=1e-6, msg=name)
            else:
                assert torch.equal(grad, local[rank][name]), f"{name} was synchronised in {phase}"
        expected = sum(g.numel() * 4 for n, g in grads.items() if n.startswith(synced_prefixes))
        assert sent == expected


def test_bf16_halves_the_bytes_and_ranks_agree(local):
    out = _run("consistency", "bf16")
    (g0, sent), (g1, _) = out[0], out[1]
    assert sent == sum(g.numel() * 2 for n, g in g0.items() if n.startswith(("c.", "shared.")))
    for name in ("c.weight", "shared.bias"):
        assert torch.equal(g0[name], g1[name])  # one rounded mean, the same on both ranks
        mean = (local[0][name] + local[1][name]) / WORLD
        torch.testing.assert_close(g0[name], mean, rtol=2e-2, atol=1e-3)


def test_set_phase_before_bind_is_an_error():
    with pytest.raises(RuntimeError, match="bind"):
        PhaseGradSync().set_phase("detail")
