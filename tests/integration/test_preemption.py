"""SLURM pre-emption: signal -> checkpoint at a step boundary -> requeue -> clean exit -> exact resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers.paths import HELPERS

from dlightning.contracts.checkpoint_format import resolve_resume_checkpoint
from dlightning.errors import ConfigError
from dlightning.training.preemption import (
    LATCH,
    PreemptionCallback,
    SignalLatch,
    install_preemption_handlers,
    requeue_slurm_job,
    slurm_requeue_target,
)

TOY = HELPERS / "toy_train.py"
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


@pytest.fixture
def keep_signal_handlers():
    """The handlers stay installed for the life of a process by design: put the test process's back."""
    saved = {sig: signal.getsignal(sig) for sig in SIGNALS}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)
    LATCH.clear()


def _child_env(bin_dir: Path, **slurm: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1", **slurm)
    return env


def _run_until_signal(run_dir: Path, env: dict[str, str], sig: signal.Signals, min_step: int = 4) -> int:
    """Start the toy trainer, send ``sig`` once it reports ``min_step`` steps, return its exit status."""
    progress = run_dir / "progress.txt"
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        str(TOY),
        "--run-dir",
        str(run_dir),
        "--max-steps",
        "100000",
        "--progress",
        str(progress),
        "--step-sleep",
        "0.02",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 90
        while not (
            progress.exists()
            and progress.read_text().strip().isdigit()
            and int(progress.read_text()) >= min_step
        ):
            assert proc.poll() is None, f"trainer exited early:\n{proc.stdout.read()}"
            assert time.time() < deadline, "trainer made no progress"
            time.sleep(0.05)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    return proc.returncode


def _preempt_files(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob("preempt-*.ckpt"))


def test_sigusr1_checkpoints_requeues_and_resumes_exactly(
    tmp_path: Path, stub_scontrol: tuple[Path, Path], keep_signal_handlers: None
) -> None:
    bin_dir, scontrol_log = stub_scontrol
    run_dir = tmp_path / "run"
    _run_until_signal(run_dir, _child_env(bin_dir, SLURM_JOB_ID="4242"), signal.SIGUSR1)

    [preempt] = _preempt_files(run_dir)
    ckpt = torch.load(preempt, weights_only=True)
    step = ckpt["dlightning"]["optimizer_step"]
    assert preempt.name == f"preempt-{step:08d}.ckpt" and step >= 4
    assert ckpt["dlightning"]["micro"] == 0  # taken at an optimizer-step boundary, not mid-accumulation
    assert scontrol_log.read_text().splitlines() == ["requeue 4242"]
    assert resolve_resume_checkpoint(run_dir) == str(preempt)

    total = step + 5
    resumed = subprocess.run(
        [sys.executable, str(TOY), "--run-dir", str(run_dir), "--max-steps", str(total), "--resume"],
        env=_child_env(bin_dir),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    final = torch.load(run_dir / "final.pt", weights_only=True)
    assert final["optimizer_step"] == total
    assert final["batches_this_process"] == 5 * 2  # it resumed: 5 steps of 2 micro-batches, not a restart

    sys.path.insert(0, str(HELPERS))
    try:
        import toy_train
    finally:
        sys.path.remove(str(HELPERS))
    reference = toy_train.train(tmp_path / "straight", total)  # the same run without interruption
    # the handler stays: SLURM's time-limit warning may still come after training ended
    assert all(LATCH.is_installed(sig) for sig in SIGNALS)
    for name, tensor in reference.layer.state_dict().items():
        assert torch.equal(final["state_dict"][name], tensor), name


def test_sigterm_checkpoints_without_requeue(tmp_path: Path, stub_scontrol: tuple[Path, Path]) -> None:
    bin_dir, scontrol_log = stub_scontrol
    run_dir = tmp_path / "run"
    _run_until_signal(run_dir, _child_env(bin_dir, SLURM_JOB_ID="4242"), signal.SIGTERM, min_step=2)
    assert len(_preempt_files(run_dir)) == 1
    assert not scontrol_log.exists()


@pytest.mark.parametrize(
    "env,expected",
    [
        ({"SLURM_JOB_ID": "100"}, "100"),
        ({"SLURM_JOB_ID": "101", "SLURM_ARRAY_JOB_ID": "90", "SLURM_ARRAY_TASK_ID": "3"}, "90_3"),
        ({}, None),
    ],
)
def test_requeue_target(env: dict[str, str], expected: str | None) -> None:
    assert slurm_requeue_target(env) == expected


def test_requeue_calls_scontrol_on_path(
    stub_scontrol: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir, scontrol_log = stub_scontrol
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert requeue_slurm_job("90_3")
    assert scontrol_log.read_text().splitlines() == ["requeue 90_3"]
    assert not requeue_slurm_job("1", scontrol="no-such-scontrol-binary")


class _FakeStrategy:
    """Stands in for a 2-rank strategy whose other rank was signalled."""

    def __init__(self, others_signalled: bool) -> None:
        self.others = others_signalled
        self.reduced: list[bool] = []

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        assert all is False  # "any rank" semantics
        self.reduced.append(decision)
        return decision or self.others


def _fake_trainer(strategy: _FakeStrategy) -> SimpleNamespace:
    saved: list[Path] = []
    return SimpleNamespace(
        strategy=strategy,
        is_global_zero=False,
        should_stop=False,
        saved=saved,
        save_checkpoint=lambda path, weights_only=None: saved.append(Path(path)),
    )


def test_any_rank_signal_stops_all_ranks_at_boundary(tmp_path: Path) -> None:
    cb = PreemptionCallback(tmp_path, latch=SignalLatch())
    module = SimpleNamespace(optimizer_step=7, at_step_boundary=False)
    trainer = _fake_trainer(_FakeStrategy(others_signalled=True))
    cb._last_step = 7
    cb.on_train_batch_end(trainer, module, None, None, 0)  # mid-accumulation: no collective, no save
    assert trainer.strategy.reduced == [] and not trainer.should_stop
    module.optimizer_step, module.at_step_boundary = 8, True
    cb.on_train_batch_end(trainer, module, None, None, 1)
    assert trainer.saved == [tmp_path / "preempt-00000008.ckpt"]
    assert trainer.should_stop and cb.preempted
    assert trainer.strategy.reduced[0] is False  # this rank itself got no signal


def test_boundary_from_counter_when_module_has_no_flag(tmp_path: Path) -> None:
    cb = PreemptionCallback(tmp_path, latch=SignalLatch())
    module = SimpleNamespace(optimizer_step=3)
    trainer = _fake_trainer(_FakeStrategy(others_signalled=False))
    cb._last_step = 3
    cb.latch.handle(signal.SIGUSR1, None)
    cb.on_train_batch_end(trainer, module, None, None, 0)
    assert trainer.saved == []  # counter did not move: not a boundary
    module.optimizer_step = 4
    cb.on_train_batch_end(trainer, module, None, None, 1)
    assert trainer.saved == [tmp_path / "preempt-00000004.ckpt"] and trainer.should_stop


def test_handler_only_records_and_stays_installed(tmp_path: Path, keep_signal_handlers: None) -> None:
    latch = install_preemption_handlers()
    cb = PreemptionCallback(tmp_path, signals=("SIGUSR1",), requeue_signals=("USR1",))
    os.kill(os.getpid(), signal.SIGUSR1)
    time.sleep(0.01)
    assert cb.signal_received and cb.requeue_requested and not list(tmp_path.iterdir())
    cb.teardown(None, None, "fit")  # not pre-empted: nothing to requeue, the handler stays
    assert latch.is_installed(signal.SIGUSR1) and latch.is_installed(signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)  # a late signal: recorded, nothing else
    time.sleep(0.01)
    assert latch.received == {signal.SIGUSR1: 1, signal.SIGTERM: 1}
    assert install_preemption_handlers().received == {}  # a new run forgets the old signals


def test_signals_are_ignored_while_python_shuts_down() -> None:
    """Python resets its signal handlers to the default action late in its shutdown, where a USR1 would
    kill a finished run; an exit hook ignores them before. The checker registered first runs last."""
    code = (
        "import atexit, signal\n"
        "atexit.register(lambda: print(signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN,"
        " signal.getsignal(signal.SIGTERM) == signal.SIG_IGN))\n"
        "from dlightning.training.preemption import LATCH, install_preemption_handlers\n"
        "install_preemption_handlers()\n"
        "print(LATCH.is_installed(signal.SIGUSR1), LATCH.is_installed(signal.SIGTERM))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True"] * 4


def test_end_segment_ignores_the_signals_before_it_requeues(tmp_path: Path, stub_scontrol: tuple[Path, Path],
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            keep_signal_handlers: None) -> None:
    """The requeue SIGTERMs every process of the job, this one included: by then it must be a no-op, and
    the ignored disposition is what scontrol itself starts with."""
    bin_dir, scontrol_log = stub_scontrol
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\ngrep SigIgn /proc/self/status >> "{scontrol_log}"\n')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    cb = PreemptionCallback(tmp_path, latch=SignalLatch(), requeue_in_teardown=False)
    trainer = _fake_trainer(_FakeStrategy(others_signalled=False))
    trainer.is_global_zero = True
    cb.latch.handle(signal.SIGUSR1, None)
    cb.on_train_batch_end(trainer, SimpleNamespace(optimizer_step=5, at_step_boundary=True), None, None, 0)
    cb.teardown(trainer, None, "fit")
    assert not scontrol_log.exists()  # requeue_in_teardown=False: the owner ends the segment
    cb.end_segment()
    cb.end_segment()  # once only
    ignored = int(scontrol_log.read_text().split()[1], 16)
    assert scontrol_log.read_text().count("SigIgn") == 1
    assert ignored & (1 << (signal.SIGUSR1 - 1)) and ignored & (1 << (signal.SIGTERM - 1))
    assert all(signal.getsignal(sig) == signal.SIG_IGN for sig in SIGNALS)


def test_bad_signal_configuration(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown signal"):
        PreemptionCallback(tmp_path, signals=("SIGNOPE",))
    with pytest.raises(ConfigError, match="subset"):
        PreemptionCallback(tmp_path, signals=("SIGTERM",), requeue_signals=("SIGUSR1",))


def test_failed_requeue_is_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    keep_signal_handlers: None) -> None:
    """scontrol failing must not look like a clean stop (fit raises on ``requeue_failed``)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    failing = bin_dir / "scontrol"
    failing.write_text("#!/bin/sh\necho 'slurm_requeue error: Access denied' >&2\nexit 1\n")
    failing.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    cb = PreemptionCallback(tmp_path, latch=SignalLatch())
    trainer = _fake_trainer(_FakeStrategy(others_signalled=False))
    trainer.is_global_zero = True
    module = SimpleNamespace(optimizer_step=5, at_step_boundary=True)
    cb.latch.handle(signal.SIGUSR1, None)
    cb.on_train_batch_end(trainer, module, None, None, 0)
    assert trainer.should_stop and not cb.requeue_failed  # the requeue comes at the end of the segment
    cb.teardown(trainer, module, "fit")
    assert cb.requeue_failed

