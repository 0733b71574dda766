"""One override grammar for every config: dotted keys, list indices, typed values, the closest key on a typo."""

from __future__ import annotations

from pathlib import Path

import pytest

from dlightning.cli import main
from dlightning.config import load_config
from dlightning.errors import ConfigError
from dlightning.shards.config import load_prep_config

CONFIGS = Path(__file__).resolve().parents[2] / "dlightning" / "configs"
TRAINING = sorted(CONFIGS.glob("*.yaml")) + sorted(CONFIGS.glob("launch/*.yaml"))
SHARDS = sorted(CONFIGS.glob("data_prep/*.yaml"))


@pytest.mark.parametrize("path", TRAINING, ids=lambda p: p.name)
def test_training_configs_take_list_index_overrides(path: Path) -> None:
    base = load_config([path])
    index = len(base.data.sources)  # the index after the last item appends one with the schema's defaults
    cfg = load_config([path], [f"data.sources.{index}.path=/data/new", f"data.sources.{index}.weight_detail=0.5",
                               "schedule.segments.1.ramp=3"])
    assert cfg.data.sources[index].path == "/data/new" and cfg.data.sources[index].weight_detail == 0.5
    assert cfg.data.sources[index].weight_consistency == 1.0  # the schema's default
    assert cfg.schedule.segments[1].ramp == 3 or cfg.schedule.preset == "reference"


@pytest.mark.parametrize("path", SHARDS, ids=lambda p: p.name)
def test_shard_configs_take_list_index_and_typed_preset_overrides(path: Path) -> None:
    cfg = load_prep_config(path, ["output_dir=/out", "sources.0.root=/data/in", "sources.0.max_clips=7",
                                  "degradation.stage1.jpeg_range=[40,95]"])
    assert (cfg.sources[0].root, cfg.sources[0].max_clips) == ("/data/in", 7)
    assert list(cfg.degradation.stage1.jpeg_range) == [40, 95]


@pytest.mark.parametrize(("override", "expected"), [
    ("data.sources.0.pth=/x", "did you mean 'data.sources.0.path'"),
    ("schedule.segments.0.endd=3", "did you mean 'schedule.segments.0.end'"),
    ("optim.lrr=1", "did you mean 'optim.lr'"),
    ("data.sources=[{path: a, weight_detial: 1}]", "did you mean 'data.sources.0.weight_detail'"),
])
@pytest.mark.parametrize("path", TRAINING, ids=lambda p: p.name)
def test_training_typo_exits_2_with_the_closest_key(path: Path, override: str, expected: str,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    # configs without data sources get one first, so that index 0 exists
    first = [] if load_config([path]).data.sources or "sources.0." not in override else ["data.sources.0.path=/a"]
    assert main(["config", "--config", str(path), *first, override]) == 2
    assert expected in caplog.text


@pytest.mark.parametrize(("override", "expected"), [
    ("sources.0.rot=/x", "did you mean 'sources.0.root'"),
    ("degradation.stage1.jpg_range=[40,95]", "did you mean 'degradation.stage1.jpeg_range'"),
    ("shards.samples_per_shrd=3", "did you mean 'shards.samples_per_shard'"),
])
@pytest.mark.parametrize("path", SHARDS, ids=lambda p: p.name)
def test_shard_typo_exits_2_with_the_closest_key(path: Path, override: str, expected: str, tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    code = main(["shards", "build", "--config", str(path), f"output_dir={tmp_path / 'out'}", override])
    assert code == 2
    assert expected in caplog.text
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_index_out_of_range_and_non_list_index_are_clear() -> None:
    with pytest.raises(ConfigError, match="index 5 is out of range"):
        load_config([], ["data.sources.5.path=/x"])
    with pytest.raises(ConfigError, match="is a list; address its items by index"):
        load_config([], ["schedule.segments.first.end=3"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config([], ["optim.lr.x=1"])
    with pytest.raises(ConfigError, match="could not be converted"):
        load_config([], ["optim.lr=fast"])


def test_malformed_yaml_exits_2(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {lr: 1\n  trainer: [\n")
    assert main(["config", "--config", str(bad)]) == 2
    assert "is not valid YAML" in caplog.text
