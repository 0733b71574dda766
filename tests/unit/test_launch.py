"""SLURM launch: the rendered sbatch script, the run-folder snapshot and the shipped launch configs."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from helpers.paths import GOLDEN as GOLDEN_DIR
from helpers.paths import REPO as ROOT
from helpers.stubs import make_stub_command

from dlightning.config import load_config
from dlightning.errors import ConfigError
from dlightning.launch.config import LaunchConfig
from dlightning.launch.sbatch import render_sbatch, submit
from dlightning.train import submit as submit_run

GOLDEN = GOLDEN_DIR / "sbatch_2x8.sh"
RUN_DIR = "/scratch/runs/sd21-2x8"


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
    assert srun == [
        f"srun --kill-on-bad-exit=1 python -m dlightning.cli fit --config {RUN_DIR}/config.yaml "
        "trainer.num_nodes=2 trainer.devices=8"
    ]
    # the environment is set up before training starts
    assert (
        lines.index("module load cuda/12.4") < lines.index("source .venv/bin/activate") < lines.index(srun[0])
    )


def test_golden_sbatch_2x8() -> None:
    text = _render(_cfg_2x8())
    if os.environ.get("DLIGHTNING_UPDATE_GOLDEN"):
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text(), (
        "rendered script changed; review and rerun with DLIGHTNING_UPDATE_GOLDEN=1"
    )


def test_readme_shows_the_golden_script() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "```bash\n" + GOLDEN.read_text() + "```" in readme, "README's copy of sbatch_2x8.sh is stale"


def test_rendered_script_is_valid_bash(tmp_path: Path) -> None:
    for cfg in (_cfg_2x8(), _cfg_2x8(use_torchrun=True)):
        script = tmp_path / "s.sh"
        script.write_text(_render(cfg))
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
    assert "--signal" not in text  # torchrun's agent would die on SIGUSR1
    assert "launch/torchrun_multinode.sh" in text and "NPROC_PER_NODE=8" in text


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"nodes": 0}, "launch.nodes"),
        ({"time": "one day"}, "launch.time"),
        ({"job_name": "bash"}, "interactive"),
        ({"signal_seconds": 5}, "signal_seconds"),
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
    with pytest.raises(ConfigError, match=r"model\.pretrained_path='/path/to/stable-diffusion-2-1-base' does not exist"):
        submit_run(cfg, dry_run=True)
    assert not run_dir.exists()
