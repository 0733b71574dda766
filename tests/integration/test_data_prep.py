"""data_prep end to end: shard round trip, manifest verification, resume, sources, config, captions."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers.paths import CONFIGS as SHIPPED_CONFIGS

from dlightning.cli import main as dlightning_main
from dlightning.contracts.shard_format import decode_png, read_manifest
from dlightning.degradation.operators import degrade_clip
from dlightning.degradation.presets import get_preset
from dlightning.degradation.sampling import sample_params
from dlightning.errors import ConfigError, MissingWeightsError
from dlightning.shards.build import build_shards as build
from dlightning.shards.captions import CaptionConfig, build_captioner
from dlightning.shards.config import (
    DataPrepConfig,
    DegradationSection,
    SourceSpec,
    demo_config,
    load_prep_config,
)
from dlightning.shards.manifest import verify_shard_set
from dlightning.shards.sources import enumerate_demo, load_clip
from dlightning.shards.writer import clip_rngs, sha256_file

CONFIGS = SHIPPED_CONFIGS / "data_prep"


def main(argv: list[str]) -> int:
    """``dlightning shards ARGV`` (what ``python -m data_prep ARGV`` runs)."""
    return dlightning_main(["shards", *argv])


def _demo_cfg(out: Path, **kw) -> DataPrepConfig:
    cfg = demo_config(str(out))
    cfg.sources[0].images = ["astronaut", "coffee", "chelsea"]
    cfg.hr_size, cfg.num_frames, cfg.progress = [64, 64], 3, False
    cfg.shards.samples_per_shard = 2
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


@pytest.fixture(scope="module")
def demo_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[DataPrepConfig, Path]:
    out = tmp_path_factory.mktemp("demo")
    cfg = _demo_cfg(out)
    build(cfg)
    return cfg, out


def _read_wds(out: Path) -> list[dict]:
    import webdataset as wds

    urls = [str(out / rec["file"]) for rec in read_manifest(out)["shards"]]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def test_demo_round_trip_matches_regenerated_clips(demo_set) -> None:
    cfg, out = demo_set
    samples = _read_wds(out)
    specs = enumerate_demo(source="demo", num_frames=3, names=["astronaut", "coffee", "chelsea"])
    assert [s["__key__"] for s in samples] == [s.key for s in specs]
    preset = get_preset("video")
    for index, (sample, spec) in enumerate(zip(samples, specs, strict=True)):
        meta = json.loads(sample["meta.json"])
        assert meta["num_frames"] == 3 and meta["hr_size"] == [64, 64] and meta["lq_size"] == [16, 16]
        assert meta["kind"] == spec.kind and "." not in sample["__key__"]
        assert ("camera_path" in meta) == (spec.kind == "image")
        # Regenerate the clip independently from its seed and compare pixel for pixel.
        load_rng, param_rng, noise_rng = clip_rngs(cfg.seed, index)
        clip = load_clip(spec, hr_hw=(64, 64), crop="center", scale=4, camera=cfg.camera, rng=load_rng)
        params = sample_params(preset, param_rng)
        lq = degrade_clip(clip.frames, params, 4, noise_rng)
        for t in range(3):
            np.testing.assert_array_equal(decode_png(sample[f"hr_{t:03d}.png"]), clip.frames[t])
            np.testing.assert_array_equal(decode_png(sample[f"lq_{t:03d}.png"]), lq[t])
        stored = json.loads(sample["deg.json"])
        assert stored["seed"] == {"build_seed": cfg.seed, "clip_index": index}
        assert stored["stage1"] == json.loads(json.dumps(params["stage1"]))
        assert sample["caption.txt"] == b""
    if any(s.kind == "image" for s in specs):
        meta = json.loads(next(s for s in samples if s["__key__"].endswith("_cam"))["meta.json"])
        assert len(meta["camera_path"]) == 3 and len(meta["camera_path"][0]) == 4


def test_manifest_lists_every_shard(demo_set) -> None:
    _, out = demo_set
    manifest = read_manifest(out)
    assert manifest["version"] == 1 and manifest["build_config"]["name"] == "demo"
    assert [r["file"] for r in manifest["shards"]] == [f"demo-{i:06d}.tar" for i in range(3)]
    for rec in manifest["shards"]:
        assert set(rec) == {"file", "samples", "bytes", "sha256"}
        assert rec["sha256"] == sha256_file(out / rec["file"])
    assert sum(r["samples"] for r in manifest["shards"]) == 6
    assert verify_shard_set(out, deep=True)[0] == []
    assert not list(out.glob("*.tmp"))


def test_verify_catches_a_flipped_byte(tmp_path: Path) -> None:
    out = tmp_path / "set"
    build(_demo_cfg(out))
    victim = out / "demo-000001.tar"
    data = bytearray(victim.read_bytes())
    data[700] ^= 0xFF
    victim.write_bytes(bytes(data))
    problems, _ = verify_shard_set(out)
    assert problems and all("demo-000001.tar" in p for p in problems)
    assert main(["verify", str(out)]) == 1


def test_verify_catches_a_missing_field(tmp_path: Path) -> None:
    import tarfile

    out = tmp_path / "set"
    build(_demo_cfg(out))
    victim = out / "demo-000000.tar"
    with tarfile.open(victim) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar if not m.name.endswith("lq_002.png")]
    with tarfile.open(victim, "w") as tar:
        for member, payload in members:
            import io

            tar.addfile(member, io.BytesIO(payload))
    problems, _ = verify_shard_set(out)
    assert any("lq frames" in p for p in problems)


def test_interrupted_build_resumes_only_missing_shard(tmp_path: Path) -> None:
    out = tmp_path / "set"
    cfg = _demo_cfg(out)
    first = build(cfg)
    assert sorted(first.built) == [f"demo-{i:06d}.tar" for i in range(3)]
    original = sha256_file(out / "demo-000001.tar")
    (out / "demo-000001.tar").unlink()
    (out / "demo-000002.tar").write_bytes(b"truncated")  # a half-written shard is rebuilt too
    second = build(cfg)
    assert sorted(second.built) == ["demo-000001.tar", "demo-000002.tar"]
    assert second.reused == ["demo-000000.tar"]
    assert sha256_file(out / "demo-000001.tar") == original  # byte-reproducible
    assert verify_shard_set(out)[0] == []
    changed = build(_demo_cfg(out, seed=1))  # a different plan rebuilds everything
    assert len(changed.built) == 3


def _write_frames(root: Path, clip: str, n: int, size: int = 40) -> None:
    (root / clip).mkdir(parents=True)
    rng = np.random.default_rng(int(clip))
    for i in range(n):
        cv2.imwrite(str(root / clip / f"{i:08d}.png"), rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_frame_folders_windows_exclusion_and_report(tmp_path: Path) -> None:
    root = tmp_path / "reds"
    for clip in ("000", "001", "002"):
        _write_frames(root, clip, 7)
    (root / "002" / "00000003.png").write_bytes(b"not a png")
    cfg = DataPrepConfig(
        output_dir=str(tmp_path / "out"),
        name="reds",
        hr_size=[32, 32],
        num_frames=3,
        progress=False,
        sources=[SourceSpec(kind="frames", root=str(root), name="reds", frame_stride=2, window_step=1)],
        degradation=DegradationSection(preset="realesrgan"),
    )
    result = build(load_prep_config(None, [], base=cfg))
    samples = _read_wds(tmp_path / "out")
    keys = [s["__key__"] for s in samples]
    # 000 is excluded (REDS4); 7 frames, stride 2 -> span 5 -> windows at 0, 1, 2; 002 loses windows
    # that touch its unreadable frame 3 (windows 1 [1,3,5]; 0 and 2 are fine).
    assert keys == ["reds_001_s0000", "reds_001_s0001", "reds_001_s0002", "reds_002_s0000", "reds_002_s0002"]
    assert json.loads(samples[1]["meta.json"])["frame_indices"] == [1, 3, 5]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert len(report["skipped"]) == 1 and "reds_002_s0001" in report["skipped"][0]["path"]
    assert result.skipped == report["skipped"]


def _write_video(path: Path, n: int, size: int = 48) -> None:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=12)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(n):
            img = np.full((size, size, 3), 20 * i % 256, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def test_video_source_and_unreadable_file(tmp_path: Path) -> None:
    root = tmp_path / "videos"
    root.mkdir()
    _write_video(root / "walk.mp4", 8)
    (root / "broken.mp4").write_bytes(b"\x00" * 100)
    cfg = DataPrepConfig(
        output_dir=str(tmp_path / "out"),
        name="vid",
        hr_size=[32, 32],
        num_frames=3,
        progress=False,
        sources=[SourceSpec(kind="video", root=str(root), name="pex", exclude=[])],
    )
    build(cfg)
    samples = _read_wds(tmp_path / "out")
    assert [s["__key__"] for s in samples] == ["pex_walk_s0000", "pex_walk_s0003"]
    meta = json.loads(samples[1]["meta.json"])
    assert meta["fps"] == pytest.approx(12.0) and meta["frame_indices"] == [3, 4, 5]
    # Frame 3 of the synthetic video has value 60 everywhere (lossy codec: close, not equal).
    assert abs(float(decode_png(samples[1]["hr_000.png"]).mean()) - 60) < 4
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [Path(s["path"]).name for s in report["skipped"]] == ["broken.mp4"]


def test_image_source_camera_path_and_captions_file(tmp_path: Path) -> None:
    root = tmp_path / "lsdir"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in ("0001", "0002"):
        cv2.imwrite(str(root / f"{name}.png"), rng.integers(0, 256, (80, 100, 3), dtype=np.uint8))
    cv2.imwrite(str(root / "tiny.png"), np.zeros((8, 8, 3), dtype=np.uint8))
    captions = tmp_path / "captions.tsv"
    captions.write_text("0001\ta red bird\n0002\tsnow\n", encoding="utf-8")
    cfg = DataPrepConfig(
        output_dir=str(tmp_path / "out"),
        name="lsdir",
        hr_size=[32, 32],
        num_frames=4,
        progress=False,
        sources=[SourceSpec(kind="images", root=str(root), name="lsdir")],
        degradation=DegradationSection(preset="dloral_mild"),
        captions=CaptionConfig(mode="file", path=str(captions)),
    )
    build(load_prep_config(None, [], base=cfg))
    samples = _read_wds(tmp_path / "out")
    assert [s["__key__"] for s in samples] == ["lsdir_0001_c0", "lsdir_0002_c0"]
    assert [s["caption.txt"].decode() for s in samples] == ["a red bird", "snow"]
    meta = json.loads(samples[0]["meta.json"])
    assert meta["kind"] == "image" and len(meta["camera_path"]) == 4
    path = np.array(meta["camera_path"])
    assert np.abs(np.diff(path[:, :2], axis=0)).max() <= cfg.camera.max_step + 1e-9  # smooth, bounded steps
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert len(report["skipped"]) == 1 and "smaller than hr_size" in report["skipped"][0]["reason"]


@pytest.mark.parametrize("name", ["demo", "reds", "lsdir"])
def test_shipped_configs_load(name: str, tmp_path: Path) -> None:
    overrides = [f"output_dir={tmp_path}"] + ([f"sources.0.root={tmp_path}"] if name != "demo" else [])
    cfg = load_prep_config(str(CONFIGS / f"{name}.yaml"), overrides)
    assert cfg.output_dir == str(tmp_path) and cfg.sources


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="bogus"):
        load_prep_config(None, ["bogus=1"])
    with pytest.raises(ConfigError, match="hr_size"):
        load_prep_config(None, ["hr_size=[30,32]"])
    with pytest.raises(ConfigError, match="preset"):
        load_prep_config(None, ["degradation.preset=strong"])


def test_caption_model_needs_local_weights(tmp_path: Path) -> None:
    with pytest.raises(MissingWeightsError, match="captions.model_path"):
        build_captioner(CaptionConfig(mode="model", model_path=str(tmp_path / "missing")))
    json_file = tmp_path / "c.json"
    json_file.write_text(json.dumps({"clip": "hello"}), encoding="utf-8")
    caption = build_captioner(CaptionConfig(mode="file", path=str(json_file)))
    assert caption("key", "clip", np.zeros((1, 4, 4, 3), np.uint8)) == "hello"
    assert caption("key", "other", np.zeros((1, 4, 4, 3), np.uint8)) == ""


def test_cli_demo_builds_and_verifies(tmp_path: Path) -> None:
    code = main(
        [
            "demo",
            str(tmp_path / "d"),
            "num_frames=2",
            "hr_size=[32,32]",
            "progress=false",
            "sources.0.images=[astronaut]",
        ]
    )
    assert code == 0
    assert main(["verify", str(tmp_path / "d"), "--deep"]) == 0


def test_worker_processes_write_identical_shards(tmp_path: Path) -> None:
    one = build(_demo_cfg(tmp_path / "one"))
    two = build(_demo_cfg(tmp_path / "two", workers=2))
    assert sorted(one.built) == sorted(two.built)
    for name in one.built:
        assert sha256_file(tmp_path / "one" / name) == sha256_file(tmp_path / "two" / name)
