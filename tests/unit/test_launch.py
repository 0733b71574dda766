"""SLURM launch: the rendered sbatch script, the run-folder snapshot and the shipped launch configs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers.paths import GOLDEN as GOLDEN_DIR
from helpers.paths import REPO as ROOT
from helpers.stubs import make_stub_command

from dlightning.cli import main as cli_main
from dlightning.config import load_config
from dlightning.errors import ConfigError
from dlightning.launch.config import LaunchConfig
from dlightning.launch.sbatch import render_sbatch, submit
from dlightning.train import submit as submit_run

GOLDEN = GOLDEN_DIR / "sbatch_2x8.sh"
GOLDEN_CPU = GOLDEN_DIR / "sbatch_cpu_1x2.sh"
RUN_DIR = "/scratch/runs/sd21-2x8"
CPU_RUN_DIR = "/scratch/runs/demo-cpu-1x2"


def _cfg_2x8(**kw: object) -> LaunchConfig:
    values = dict(
        nodes=2,
        gpus_per_node=8,
        partition="gpu",
        account="proj123",
        time="24:00:00",
        constraint="h100",
        qos="normal",
        cpus_per_task=12,
        mem="480G",
        env_setup=["module load cuda/12.4", "source .venv/bin/activate"],
        extra_sbatch=["--exclusive", "#SBATCH --mail-type=FAIL"],
    )
    values.update(kw)
    return LaunchConfig(**values)


def _render(cfg: LaunchConfig) -> str:
    return render_sbatch(cfg, run_dir=RUN_DIR, config_path=f"{RUN_DIR}/config.yaml")


def test_required_directives_2x8() -> None:
    lines = _render(_cfg_2x8()).splitlines()
    directives = [line.removeprefix("#SBATCH ") for line in lines if line.startswith("#SBATCH ")]
    expected = [
        "--job-name=dlightning",
        "--nodes=2",
        "--ntasks-per-node=8",
        "--gpus-per-node=8",
        "--cpus-per-task=12",
        "--mem=480G",
        "--partition=gpu",
        "--account=proj123",
        "--time=24:00:00",
        "--constraint=h100",
        "--qos=normal",
        "--signal=SIGUSR1@90",
        "--requeue",
        "--open-mode=append",
        f"--output={RUN_DIR}/slurm-%j.out",
        f"--error={RUN_DIR}/slurm-%j.out",
        "--exclusive",
        "--mail-type=FAIL",
    ]
    assert directives == expected
    assert not any("B:" in d for d in directives)  # the signal must reach the srun tasks, not only bash
    assert lines[0] == "#!/bin/bash"
    srun = [line for line in lines if line.startswith("srun")]
    assert srun == [  # in the background: the batch shell waits for it and handles the signals
        f"srun --kill-on-bad-exit=1 python -m dlightning.cli fit --config {RUN_DIR}/config.yaml "
        "trainer.num_nodes=2 trainer.devices=8 &"
    ]
    # the environment is set up before training starts
    assert (
        lines.index("module load cuda/12.4") < lines.index("source .venv/bin/activate") < lines.index(srun[0])
    )


def _cfg_cpu() -> LaunchConfig:
    return LaunchConfig(nodes=1, gpus_per_node=0, cpus_per_task=1, time="30:00", job_name="dlightning-cpu",
                        env_setup=["source .venv/bin/activate"])


def _render_cpu(cfg: LaunchConfig, tasks: int = 2, **kw: object) -> str:
    return render_sbatch(cfg, run_dir=CPU_RUN_DIR, config_path=f"{CPU_RUN_DIR}/config.yaml",
                         cpu_tasks_per_node=tasks, **kw)


def _check_golden(path: Path, text: str) -> None:
    if os.environ.get("DLIGHTNING_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), (
        f"rendered script changed ({path.name}); review and rerun with DLIGHTNING_UPDATE_GOLDEN=1"
    )


def test_golden_sbatch_2x8() -> None:
    _check_golden(GOLDEN, _render(_cfg_2x8()))


def test_golden_sbatch_cpu_1x2() -> None:
    """A job without GPUs: no GPU directive, tasks per node from trainer.devices, trainer on cpu."""
    text = _render_cpu(_cfg_cpu())
    _check_golden(GOLDEN_CPU, text)
    assert "gpu" not in text.replace("dlightning", "").lower()  # no --gpus*, --gres=gpu
    assert "#SBATCH --ntasks-per-node=2" in text
    assert "trainer.num_nodes=1 trainer.devices=2 trainer.accelerator=cpu &" in text


def test_readme_shows_the_golden_script() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "```bash\n" + GOLDEN.read_text() + "```" in readme, "README's copy of sbatch_2x8.sh is stale"


def test_rendered_script_is_valid_bash(tmp_path: Path) -> None:
    for text in (_render(_cfg_2x8()), _render(_cfg_2x8(use_torchrun=True)), _render_cpu(_cfg_cpu())):
        script = tmp_path / "s.sh"
        script.write_text(text)
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr


def test_optional_directives_left_out_and_no_requeue() -> None:
    text = _render(LaunchConfig(nodes=1, gpus_per_node=4, requeue=False, signal_seconds=300))
    for absent in ("--partition", "--account", "--time", "--constraint", "--qos", "--mem", "--requeue"):
        assert f"#SBATCH {absent}" not in text
    assert "#SBATCH --signal=SIGUSR1@300" in text and "#SBATCH --ntasks-per-node=4" in text


def test_torchrun_mode_one_task_per_node() -> None:
    text = _render(_cfg_2x8(use_torchrun=True))
    assert "#SBATCH --ntasks-per-node=1" in text and "#SBATCH --cpus-per-task=96" in text
    assert "#SBATCH --signal" not in text  # torchrun's agent would die on SIGUSR1
    assert "launch/torchrun_multinode.sh" in text and "NPROC_PER_NODE=8" in text
    assert 'kill -TERM "$step_pid"' in text  # the batch shell passes TERM on instead (its workers save)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"nodes": 0}, "launch.nodes"),
        ({"time": "one day"}, "launch.time"),
        ({"job_name": "bash"}, "interactive"),
        ({"signal_seconds": 5}, "signal_seconds"),
        ({"gpus_per_node": -1}, "gpus_per_node"),
        ({"gpus_per_node": 0, "use_torchrun": True}, "use_torchrun needs GPUs"),
    ],
)
def test_launch_config_validation(kw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        LaunchConfig(**kw)


@pytest.fixture
def stub_sbatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir, log = make_stub_command(tmp_path, "sbatch", reply="Submitted batch job 123")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return log


def test_submit_snapshots_run(tmp_path: Path, stub_sbatch: Path) -> None:
    config = tmp_path / "resolved.yaml"
    config.write_text("trainer:\n  max_steps: 10\n")
    run_dir = tmp_path / "run"
    script = submit(_cfg_2x8(), run_dir=run_dir, config_path=config, dry_run=True)
    assert not stub_sbatch.exists()  # dry run: nothing submitted
    assert script == run_dir / "train.sbatch"
    assert (run_dir / "config.yaml").read_text() == config.read_text()
    version = (run_dir / "code_version.txt").read_text()
    assert version.startswith("commit: ") and "dirty: " in version
    assert f"--config {run_dir}/config.yaml" in script.read_text()
    submit(_cfg_2x8(), run_dir=run_dir, config_path=run_dir / "config.yaml")
    assert stub_sbatch.read_text().split() == [str(script)]


def test_submit_from_shipped_configs(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shards = tmp_path / "shards"
    shards.mkdir()  # submit checks that the data the job reads exists before it queues the job
    cfg = load_config([str(ROOT / "configs/demo.yaml"), str(ROOT / "configs/launch/2x8.yaml")],
                      [f"trainer.run_dir={run_dir}", f"data.sources.0.path={shards}", f"data.sources.1.path={shards}",
                       f"validation.shards={shards}"])
    script = submit_run(cfg, dry_run=True)
    snapshot = load_config([run_dir / "config.yaml"])
    assert (snapshot.launch.nodes, snapshot.launch.gpus_per_node) == (2, 8)
    assert (snapshot.trainer.num_nodes, snapshot.trainer.devices) == (2, 8)
    assert snapshot.trainer.run_dir == str(run_dir)
    assert "#SBATCH --nodes=2" in script.read_text() and "#SBATCH --ntasks-per-node=8" in script.read_text()


def test_shipped_launch_config_is_consistent() -> None:
    cfg = load_config([ROOT / "configs/launch/2x8.yaml"])
    assert (
        (cfg.trainer.num_nodes, cfg.trainer.devices) == (cfg.launch.nodes, cfg.launch.gpus_per_node) == (2, 8)
    )


def test_submit_refuses_missing_local_paths_before_writing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = load_config([str(ROOT / "configs/sd21.yaml"), str(ROOT / "configs/launch/2x8.yaml")],
                      [f"trainer.run_dir={run_dir}"])
    missing = r"model\.pretrained_path='/path/to/stable-diffusion-2-1-base' does not exist"
    with pytest.raises(ConfigError, match=missing):
        submit_run(cfg, dry_run=True)
    assert not run_dir.exists()


# ---- CPU-only jobs and sbatch errors (a cluster without GPUs rejects any GPU directive) -------------


def _demo_cpu_cfg(run_dir: Path, *extra: str):
    return load_config([str(ROOT / "configs/demo.yaml")],
                       [f"trainer.run_dir={run_dir}", "launch.gpus_per_node=0", "trainer.devices=2",
                        "data.backend=synthetic", "validation.every_n_steps=0", *extra])


def test_cpu_only_submit_renders_no_gpu_directive(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    script = submit_run(_demo_cpu_cfg(run_dir), dry_run=True).read_text()
    assert "#SBATCH --gpus" not in script and "#SBATCH --gres" not in script
    assert "#SBATCH --ntasks-per-node=2" in script
    snapshot = load_config([run_dir / "config.yaml"])
    assert (snapshot.trainer.devices, snapshot.trainer.accelerator, snapshot.launch.gpus_per_node) == (2, "cpu", 0)


def test_cpu_only_job_refuses_a_gpu_accelerator(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="trainer.accelerator=cpu"):
        submit_run(_demo_cpu_cfg(tmp_path / "run", "trainer.accelerator=gpu"), dry_run=True)


@pytest.fixture
def refusing_sbatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text("#!/bin/sh\necho 'sbatch: error: Invalid generic resource (gres) specification' >&2\n"
                      "echo 'sbatch: error: Batch job submission failed' >&2\nexit 1\n")
    sbatch.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_sbatch_failure_is_one_line_config_error(tmp_path: Path, refusing_sbatch: None) -> None:
    with pytest.raises(ConfigError) as err:
        submit(_cfg_2x8(), run_dir=tmp_path / "run", config_path=_config_file(tmp_path))
    message = str(err.value)
    assert "\n" not in message and "Invalid generic resource (gres) specification" in message
    assert "exit 1" in message


def test_cli_submit_failure_exits_2_without_traceback(tmp_path: Path, refusing_sbatch: None,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    code = cli_main(["submit", "--config", str(ROOT / "configs/demo.yaml"), f"trainer.run_dir={tmp_path / 'run'}",
                     "data.backend=synthetic", "validation.every_n_steps=0"])
    captured = capsys.readouterr()
    assert code == 2
    assert "Traceback" not in captured.out + captured.err


def _config_file(tmp_path: Path) -> Path:
    config = tmp_path / "resolved.yaml"
    config.write_text("trainer:\n  max_steps: 10\n")
    return config


# ---- the batch shell's signal handling (bash with a stand-in srun, no SLURM) --------------------------

# The task: writes its pid to ready, records each USR1/TERM it gets, exits 0 on USR1 (or 3 after 60 s).
TASK = textwrap.dedent(
    """
    import os, pathlib, signal, sys, time
    out = pathlib.Path(sys.argv[1])
    got = []
    def handler(sig, frame):
        got.append(signal.Signals(sig).name)
        (out / "got").write_text(" ".join(got))
    signal.signal(signal.SIGUSR1, handler)
    signal.signal(signal.SIGTERM, handler)
    (out / "ready").write_text(str(os.getpid()))
    t0 = time.time()
    while "SIGUSR1" not in got:
        if time.time() - t0 > 60:
            sys.exit(3)
        time.sleep(0.05)
    """
)


def _shell_job(tmp_path: Path) -> tuple[Path, dict[str, str], Path]:
    """The rendered CPU script, running TASK through a stand-in srun that execs its command."""
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "task.py").write_text(TASK)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "srun").chmod(0o755)
    command = f"{sys.executable} {tmp_path / 'task.py'} {out}"
    script = tmp_path / "train.sbatch"
    script.write_text(_render_cpu(LaunchConfig(gpus_per_node=0, cpus_per_task=1), command=command))
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    return script, env, out


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the batch shell ended early: {proc.communicate()}"
        assert time.monotonic() < deadline, f"{path.name} did not appear"
        time.sleep(0.05)


def test_batch_shell_survives_term_and_forwards_usr1(tmp_path: Path) -> None:
    """What ``scancel --signal=USR1 --full`` and ``--signal=B:USR1@N`` do to the batch shell: bash dies of
    an untrapped USR1 (and the job with it, before any checkpoint). The rendered shell passes USR1 on to
    srun (which forwards it to the tasks), outlives a TERM and exits with srun's status."""
    script, env, out = _shell_job(tmp_path)
    shell = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    try:
        _wait_for(out / "ready", shell)
        time.sleep(0.3)  # the trap is set before srun starts; give bash time to reach its wait
        shell.send_signal(signal.SIGTERM)  # SLURM sends TERM to the tasks itself; the shell must just wait
        time.sleep(0.5)
        assert shell.poll() is None, shell.communicate()
        shell.send_signal(signal.SIGUSR1)
        log, _ = shell.communicate(timeout=30)
    finally:
        if shell.poll() is None:
            shell.kill()
        _kill_if_alive(int((out / "ready").read_text()))  # the task outlives a shell that died
    assert shell.returncode == 0, log
    assert (out / "got").read_text() == "SIGUSR1", log  # TERM was not passed on, USR1 was
    assert "batch shell got USR1" in log and "batch shell got TERM" in log


def _kill_if_alive(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
