"""Non-finite loss agreement across ranks and the consecutive-skip limit."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dlightning.errors import ConfigError
from dlightning.training.nonfinite import NonFiniteLossError, NonFiniteTracker, all_ranks_finite


@pytest.mark.parametrize(
    "value,expected",
    [
        (torch.tensor(1.5), True),
        (torch.tensor(float("nan")), False),
        (torch.tensor(float("inf")), False),
        (torch.tensor([1.0, -float("inf")]), False),
        (torch.tensor([0.0, 2.0], dtype=torch.bfloat16), True),
    ],
)
def test_single_process(value: torch.Tensor, expected: bool) -> None:
    from lightning.pytorch.strategies import SingleDeviceStrategy

    assert all_ranks_finite(value, SingleDeviceStrategy(device=torch.device("cpu"))) is expected


class _SyncStrategy:
    """The subset of a Lightning strategy that all_ranks_finite uses, backed by the real process group."""

    world_size = 2
    root_device = torch.device("cpu")

    def reduce(self, tensor: torch.Tensor, reduce_op: str = "mean") -> torch.Tensor:
        # Lightning's DDPStrategy.reduce maps the op name onto ReduceOp the same way (importing
        # Lightning in both children would double this test's run time)
        dist.all_reduce(tensor, op=getattr(dist.ReduceOp, reduce_op.upper()))
        return tensor


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        results = {}
        # step 0: both finite; step 1: NaN on rank 1 only; step 2: inf on rank 0 only
        losses = {0: [1.0, 2.0, float("inf")], 1: [1.0, float("nan"), 3.0]}[rank]
        results["strategy"] = [all_ranks_finite(torch.tensor(v), _SyncStrategy()) for v in losses]
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_gloo_every_rank_agrees(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert results["strategy"] == [True, False, False], rank


def test_tracker_raises_after_k_consecutive() -> None:
    tracker = NonFiniteTracker(max_consecutive=3)
    for step, finite in enumerate([False, False, True, False, False]):
        tracker.update(finite, step=step)
    assert (tracker.consecutive, tracker.skipped_total) == (2, 4)
    with pytest.raises(NonFiniteLossError) as info:
        tracker.update(False, step=5)
    assert isinstance(info.value, RuntimeError)
    message = str(info.value)
    assert "3 consecutive" in message and "step 5" in message and "5 skipped in total" in message
    assert "learning rate" in message  # says what to check


def test_tracker_state_roundtrip() -> None:
    tracker = NonFiniteTracker(max_consecutive=2)
    tracker.update(False, step=10)
    state = tracker.state_dict()
    assert state == {"consecutive": 1, "skipped_total": 1, "last_bad_step": 10}
    restored = NonFiniteTracker(max_consecutive=2)
    restored.load_state_dict(state)
    with pytest.raises(NonFiniteLossError):  # the run in a row continues across a resume
        restored.update(False, step=11)


def test_tracker_rejects_bad_limit() -> None:
    with pytest.raises(ConfigError, match="max_nonfinite_steps"):
        NonFiniteTracker(0)
