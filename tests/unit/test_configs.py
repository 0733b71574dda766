"""Every shipped config loads and builds; bad keys fail early with the closest valid key."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.paths import REPO as ROOT

from dlightning.config import RootConfig, from_container, load_config, to_container
from dlightning.errors import ConfigError, MissingWeightsError

CONFIGS = ROOT / "configs"
TRAINING = sorted(p for p in CONFIGS.glob("*.yaml"))
OVERLAYS = {"reference_parity_forward.yaml": "sd21.yaml", "reference_parity_gradient.yaml": "sd21.yaml"}
LAUNCH = sorted((CONFIGS / "launch").glob("*.yaml"))
DATA_PREP = sorted((CONFIGS / "data_prep").glob("*.yaml"))


def _files(path: Path) -> list[Path]:
    base = OVERLAYS.get(path.name)
    return [CONFIGS / base, path] if base else [path]


def test_every_config_folder_is_covered():
    assert {p.parent.name for p in CONFIGS.rglob("*.yaml")} <= {"configs", "launch", "data_prep"}
    assert TRAINING and LAUNCH and DATA_PREP


@pytest.mark.parametrize("path", TRAINING, ids=lambda p: p.name)
def test_training_config_loads_and_builds(path, tmp_path):
    cfg = load_config(_files(path), [f"trainer.run_dir={tmp_path}"])
    assert isinstance(cfg, RootConfig)
    # The resolved config survives the checkpoint round trip as plain types.
    assert from_container(to_container(cfg)) == cfg
    from dlightning.train import build_module

    if cfg.model.preset == "tiny":
        module = build_module(cfg)
        groups = module.generator.parameter_groups()
        assert all(groups[name] for name in ("c_lora", "cfr", "d_lora", "conv_in"))
    else:
        # Real-weight configs carry placeholder paths: building must stop at once, naming the key.
        with pytest.raises(MissingWeightsError, match="model.pretrained_path"):
            build_module(cfg)


@pytest.mark.parametrize("path", LAUNCH, ids=lambda p: p.name)
def test_launch_overlay_loads_on_top_of_sd21(path, tmp_path):
    from dlightning.launch.sbatch import render_sbatch

    cfg = load_config([CONFIGS / "sd21.yaml", path], [f"trainer.run_dir={tmp_path}"])
    assert cfg.launch.nodes == cfg.trainer.num_nodes
    assert cfg.launch.gpus_per_node == cfg.trainer.devices
    script = render_sbatch(cfg.launch, run_dir=tmp_path, config_path=tmp_path / "config.yaml")
    assert "#SBATCH --signal=SIGUSR1@" in script


@pytest.mark.parametrize("path", DATA_PREP, ids=lambda p: p.name)
def test_data_prep_config_loads(path):
    from dlightning.shards.config import load_prep_config

    overrides = [] if "demo" in path.name else ["sources.0.root=/data/in", "output_dir=/data/out"]
    cfg = load_prep_config(path, overrides)
    assert cfg.sources


def test_sd21_inspection_config_builds_on_meta():
    from dlightning.models.inspect import inspect_model

    cfg = load_config([CONFIGS / "sd21.yaml"], ["model.preset=sd21_meta"])
    report = inspect_model(cfg.model)
    assert report


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("optim.lrr=1", "did you mean 'optim.lr'"),
        ("model.cfr.heds=3", "did you mean 'model.cfr.heads'"),
        ("trainer.max_step=3", "did you mean 'trainer.max_steps'"),
        ("schedule.segments=[{phase: detail, endd: 3}]", "did you mean 'schedule.segments.0.end'"),
        ("modle.preset=tiny", "did you mean 'model'"),
    ],
)
def test_unknown_key_names_the_closest_valid_key(override, expected):
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        load_config([], [override])


def test_invalid_values_and_cross_section_checks():
    with pytest.raises(ConfigError, match="model.preset"):
        load_config([], ["model.preset=huge"])
    with pytest.raises(ConfigError, match="data.scale"):
        load_config([], ["data.scale=2", "data.crop_size=64"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config([], ["optim.lr"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(["no/such/file.yaml"])


def test_later_files_and_overrides_win(tmp_path):
    first = tmp_path / "a.yaml"
    second = tmp_path / "b.yaml"
    first.write_text("optim: {lr: 1.0e-3, accumulate: 4}\n")
    second.write_text("optim: {lr: 2.0e-3}\n")
    cfg = load_config([first, second], ["optim.eps=1e-6"])
    assert (cfg.optim.lr, cfg.optim.accumulate, cfg.optim.eps) == (2e-3, 4, 1e-6)
    assert cfg.optim.betas == [0.9, 0.999]  # untouched defaults stay


def test_deepspeed_rejects_what_zero2_cannot_do():
    with pytest.raises(ConfigError, match="optim.accumulate"):
        load_config([], ["trainer.strategy=deepspeed_stage_2", "optim.accumulate=2"])
    with pytest.raises(ConfigError, match="mask_mode"):
        load_config([], ["trainer.strategy=deepspeed_stage_2", "optim.mask_mode=drop_grad"])
    cfg = load_config([], ["trainer.strategy=deepspeed_stage_2"])
    assert cfg.optim.accumulate == 1 and cfg.optim.mask_mode == "zero_lr"  # auto, resolved at load
