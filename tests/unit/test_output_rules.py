"""The rules of what upscale, export and the shard manifest reader accept, as plain functions (no model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dlightning.contracts import export_format
from dlightning.contracts.shard_format import read_manifest
from dlightning.errors import ConfigError, MissingWeightsError
from dlightning.export import check_export_target
from dlightning.inference.pipeline import (
    MAX_FRAME_PIXELS,
    MAX_FRAME_SIDE,
    check_frame_sizes,
    enlarged_size,
    processed_size,
)
from dlightning.inference.video_io import VideoSource, is_frame_name, temp_sibling


def test_enlarged_and_processed_sizes():
    assert enlarged_size(9, 13, 16) == (16, 23)  # short side 9 -> 16, long side in proportion
    assert enlarged_size(200, 300, 128) == (200, 300)  # already large enough
    assert enlarged_size(9, 13, 0) == (9, 13)  # 0 = never enlarge
    assert processed_size(9, 13, 4, 0) == (40, 56)  # padded to even sides (x4 needs multiples of 2)
    assert processed_size(8, 400, 4, 128) == (512, 25600)


def _source(h: int, w: int) -> VideoSource:
    return VideoSource(path=Path("clip.mp4"), kind="video", fps=None, num_frames=1, size=(h, w))


def test_frame_size_limits():
    check_frame_sizes([_source(2160, 3840)], 4, 128)  # 4K x4: 15360 x 8640 fits
    assert 15360 * 8640 <= MAX_FRAME_PIXELS and 15360 <= MAX_FRAME_SIDE
    with pytest.raises(ConfigError, match="downscale the input"):
        check_frame_sizes([_source(100, 4200)], 4, 0)
    with pytest.raises(ConfigError, match="lower --min-short-side"):
        check_frame_sizes([_source(16, 16)], 4, 4096)
    check_frame_sizes([VideoSource(Path("x"), "video", None, 1, size=None)], 4, 4096)  # unknown size: no check


def test_frame_names_and_temporary_siblings(tmp_path):
    assert is_frame_name("frame_000123.png")
    assert not any(map(is_frame_name, ["frame_1.png", "frame_0000001.png", "frame_000001.PNG", "x.png"]))
    video, folder = temp_sibling(tmp_path / "out.mp4"), temp_sibling(tmp_path / "out")
    assert video.parent == folder.parent == tmp_path
    assert video.suffix == ".mp4" and video.name.startswith("out.tmp-") and folder.name.startswith("out.tmp-")
    assert temp_sibling(tmp_path / "out") != folder  # random: never an existing folder of the user's


def _fake_export(folder: Path) -> Path:
    folder.mkdir()
    for name in (export_format.UNET_DIR, *export_format.BASE_COMPONENTS):
        (folder / name).mkdir()
    (folder / export_format.CFR_FILE).write_bytes(b"")
    (folder / export_format.METADATA_FILE).write_text("{}")
    return folder


def test_export_target_rules(tmp_path):
    check_export_target(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    check_export_target(tmp_path / "empty")
    export = _fake_export(tmp_path / "export")
    assert export_format.foreign_entries(export) == []
    with pytest.raises(ConfigError, match="--overwrite"):
        check_export_target(export)
    check_export_target(export, overwrite=True)
    (export / "notes.txt").write_text("mine")
    assert export_format.foreign_entries(export) == ["notes.txt"]
    with pytest.raises(ConfigError, match="notes.txt"):
        check_export_target(export, overwrite=True)
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="is a file"):
        check_export_target(tmp_path / "file", overwrite=True)


def test_export_metadata_without_its_required_keys_is_refused(tmp_path):
    meta = {k: 1 for k in export_format.REQUIRED_KEYS}
    export_format.write_metadata(tmp_path, meta)
    assert export_format.read_metadata(tmp_path)["scale"] == 1
    for damaged in ({"format": 1, "prompt": ""}, {**meta, "scale": "4"}, {**meta, "format": "one"}, [1]):
        (tmp_path / export_format.METADATA_FILE).write_text(json.dumps(damaged))
        with pytest.raises(MissingWeightsError, match="re-run `dlightning export`"):
            export_format.read_metadata(tmp_path)


@pytest.mark.parametrize("name", ["../x.tar", "/abs/x.tar", "sub/x.tar", ".."])
def test_manifest_records_name_files_in_the_set_folder(tmp_path, name):
    record = {"file": name, "samples": 1, "bytes": 1, "sha256": "0"}
    (tmp_path / "manifest.json").write_text(json.dumps({"version": 1, "shards": [record]}))
    with pytest.raises(ConfigError, match="not a file name in the shard-set folder"):
        read_manifest(tmp_path)
