"""Training loader: bad data skipped and counted, rank streams, aligned crops, phases, workers."""

from __future__ import annotations

import json
import logging
from collections import Counter
from itertools import product

import cv2
import numpy as np
import pytest
import torch
from helpers.shard_sets import write_faulty_set, write_good_set

from dlightning.data.config import DataConfig, SourceConfig
from dlightning.data.loader import build_train_dataloader, worker_micro_batches
from dlightning.data.synthetic import SyntheticBatchBuilder
from dlightning.errors import ConfigError


def always(phase):
    return lambda m: phase


def make_cfg(*paths, **overrides) -> DataConfig:
    weights = overrides.pop("weights", [(1.0, 0.0)] * len(paths))
    sources = [SourceConfig(path=str(p), weight_consistency=wc, weight_detail=wd)
               for p, (wc, wd) in zip(paths, weights, strict=True)]
    base = dict(sources=sources, frames=3, crop_size=32, scale=4, batch_size=2, num_workers=0,
                shuffle_buffer=4, batches_per_epoch=6, seed=7)
    base.update(overrides)
    return DataConfig(**base)


def run_epochs(loader, epochs: int = 1) -> list[dict]:
    return [batch for _ in range(epochs) for batch in loader]


def to_uint8(clip: torch.Tensor) -> np.ndarray:
    """(T, 3, H, W) in [-1, 1] -> (T, H, W, 3) uint8."""
    return ((clip.numpy().transpose(0, 2, 3, 1) + 1.0) * 127.5).round().astype(np.uint8)


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    folder = tmp_path_factory.mktemp("faulty") / "video"
    return folder, write_faulty_set(folder)


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("two")
    video = write_good_set(root / "video", name="vid", kind="video", num_shards=4, per_shard=3, seed=1)
    image = write_good_set(root / "image", name="img", kind="image", num_shards=2, per_shard=3, seed=2)
    return root, video, image


@pytest.mark.parametrize("resampled", [False, True])
def test_faulty_shards_yield_only_whole_samples_and_count_skips(faulty, resampled):
    folder, info = faulty
    cfg = make_cfg(folder, resampled=resampled, batches_per_epoch=10)
    batches = run_epochs(build_train_dataloader(cfg, phase_fn=always("consistency"), phases=["consistency"]))
    assert len(batches) == 10
    skipped, keys = Counter(), []
    for batch in batches:
        assert batch["hr"].shape == (2, 3, 3, 32, 32) and batch["lq"].shape == (2, 3, 3, 8, 8)
        assert batch["hr"].dtype == torch.float32 and -1.0 <= batch["hr"].min() and batch["hr"].max() <= 1.0
        skipped.update(batch["skipped"])
        keys += batch["key"]
    assert set(keys) <= set(info["valid"]) and not set(keys) & info["bad"]
    # Every clip is the stored one, whole (no crop / flips can change a 32x32 noise clip into another).
    for batch in batches:
        for i, key in enumerate(batch["key"]):
            hr, lq = info["valid"][key]
            assert to_uint8(batch["hr"][i]).astype(int).sum() == hr.astype(int).sum()
    assert skipped["empty_shard"] >= 1
    assert skipped["tar_error"] >= 1  # the truncated shard
    if not resampled:  # one pass over all shards is guaranteed: every fault is met
        assert skipped["missing_field"] >= 2  # the sample without lq_002 and the truncated tail
        assert skipped["decode_error"] >= 1 and skipped["size_mismatch"] >= 1


def test_ranks_draw_different_resampled_streams_of_equal_length(two_sources):
    root, _, _ = two_sources
    cfg = make_cfg(root / "video", resampled=True, batches_per_epoch=5)
    per_rank = [run_epochs(build_train_dataloader(cfg, rank=r, world_size=2, phase_fn=always("consistency"),
                                                  phases=["consistency"])) for r in (0, 1)]
    assert [len(b) for b in per_rank] == [5, 5]
    keys = [[k for b in batches for k in b["key"]] for batches in per_rank]
    assert keys[0] != keys[1]
    assert not torch.equal(per_rank[0][0]["hr"], per_rank[1][0]["hr"])


def test_split_by_node_gives_disjoint_shards(two_sources):
    root, video, _ = two_sources
    cfg = make_cfg(root / "video", resampled=False, batches_per_epoch=6)
    shards_seen = []
    for rank in (0, 1):
        loader = build_train_dataloader(cfg, rank=rank, world_size=2, phase_fn=always("consistency"),
                                        phases=["consistency"])
        batches = run_epochs(loader)
        assert len(batches) == 6
        shards_seen.append({video[k][2] for b in batches for k in b["key"]})
    assert shards_seen == [{0, 2}, {1, 3}]  # shards[rank::world_size], every shard read within the epoch


def test_split_by_node_needs_enough_shards(two_sources):
    root, _, _ = two_sources
    cfg = make_cfg(root / "image", resampled=False, num_streams=2)
    with pytest.raises(ConfigError, match=r"data\.sources\.0\.path"):
        build_train_dataloader(cfg, rank=0, world_size=2, phase_fn=always("consistency"),
                               phases=["consistency"])


def test_crops_aligned_and_augmentation_shared_by_frames_and_hr_lq(tmp_path):
    clips = write_good_set(tmp_path / "big", name="big", kind="video", num_shards=1, per_shard=4, seed=3,
                           frames=5, hr_size=64)
    cfg = make_cfg(tmp_path / "big", crop_size=32, batches_per_epoch=8, augment=True)
    batches = run_epochs(build_train_dataloader(cfg, phase_fn=always("consistency"), phases=["consistency"]))
    positions, transforms = set(), set()
    for batch in batches:
        for i, key in enumerate(batch["key"]):
            hr_crop, lq_crop = to_uint8(batch["hr"][i]), to_uint8(batch["lq"][i])
            # HR crop downsampled with the op that made LQ equals the LQ crop exactly.
            down = np.stack([cv2.resize(f, (8, 8), interpolation=cv2.INTER_AREA) for f in hr_crop])
            np.testing.assert_array_equal(down, lq_crop)
            t0, y, x, g = locate(clips[key][0], hr_crop)
            assert y % 4 == 0 and x % 4 == 0
            lq_orig = clips[key][1][t0:t0 + 3, y // 4:y // 4 + 8, x // 4:x // 4 + 8]
            np.testing.assert_array_equal(dihedral(lq_orig, *g), lq_crop)
            positions.add((y, x))
            transforms.add(g)
    assert len(positions) > 1 and len(transforms) > 1


def dihedral(frames: np.ndarray, k: int, flip: bool) -> np.ndarray:
    """Reference symmetry: transpose-free formulation (rotate k times, then mirror columns)."""
    out = np.rot90(frames, k=k, axes=(1, 2))
    return out[:, :, ::-1] if flip else out


def locate(hr: np.ndarray, crop: np.ndarray) -> tuple[int, int, int, tuple[int, bool]]:
    """Find (window start, y, x, symmetry) with symmetry(hr[t0:t0+T, y:y+c, x:x+c]) == crop for all frames."""
    frames, c = crop.shape[0], crop.shape[1]
    matches = []
    for k, flip in product(range(4), (False, True)):
        undone = np.rot90(crop[:, :, ::-1] if flip else crop, k=-k, axes=(1, 2))
        # candidate top-left corners: where the first pixel of the undone crop occurs
        for t0, y, x in zip(*np.nonzero(np.all(hr == undone[0, 0, 0], axis=-1)), strict=True):
            patch = hr[t0:t0 + frames, y:y + c, x:x + c]
            if patch.shape == undone.shape and np.array_equal(dihedral(patch, k, flip), crop):
                matches.append((int(t0), int(y), int(x), (k, flip)))
    assert len(matches) == 1, matches
    return matches[0]


def test_phase_aware_source_choice(two_sources):
    root, _, _ = two_sources
    cfg = make_cfg(root / "video", root / "image", weights=[(1.0, 0.0), (0.0, 1.0)], batches_per_epoch=8)
    loader = build_train_dataloader(cfg, phase_fn=lambda m: "consistency" if m < 4 else "detail")
    for batch in run_epochs(loader):
        expected = "video" if batch["micro_batch"] < 4 else "image"
        assert batch["kind"] == [expected] * 2


def test_few_shards_warn_in_resampled_mode(two_sources):
    root, _, _ = two_sources
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("dlightning.data.loader")
    logger.addHandler(handler)
    try:
        cfg = make_cfg(root / "image", resampled=True, num_streams=2)  # 2 shards < 2 ranks x 2 streams
        build_train_dataloader(cfg, rank=1, world_size=2, phase_fn=always("consistency"),
                               phases=["consistency"])
    finally:
        logger.removeHandler(handler)
    assert any("samples will repeat" in r.getMessage() and "data.sources.0.path" in r.getMessage()
               for r in records)


def test_missing_weight_for_a_used_phase_is_a_config_error(two_sources):
    root, _, _ = two_sources
    cfg = make_cfg(root / "video", weights=[(1.0, 0.0)])
    with pytest.raises(ConfigError, match="weight_detail"):
        build_train_dataloader(cfg, phase_fn=always("detail"), phases=["consistency", "detail"])


def test_source_errors_name_the_config_key(tmp_path, two_sources):
    root, _, _ = two_sources
    with pytest.raises(ConfigError, match=r"data\.sources\.1\.path.*not a folder"):
        build_train_dataloader(make_cfg(root / "video", tmp_path / "nope"), phase_fn=always("consistency"),
                               phases=["consistency"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"data\.sources\.0\.path.*manifest\.json"):
        build_train_dataloader(make_cfg(tmp_path / "empty"), phase_fn=always("consistency"),
                               phases=["consistency"])
    (tmp_path / "empty" / "manifest.json").write_text(json.dumps({"version": 1, "shards": []}))
    with pytest.raises(ConfigError, match="no existing shard"):
        build_train_dataloader(make_cfg(tmp_path / "empty"), phase_fn=always("consistency"),
                               phases=["consistency"])


def test_workers_reproduce_main_process_batches(two_sources):
    """Two workers and none give the same batch sequence (same seeds, same num_streams), over 2 epochs."""
    root, _, _ = two_sources
    results = []
    for workers in (0, 2):
        cfg = make_cfg(root / "video", root / "image", weights=[(1.0, 0.5), (0.0, 1.0)], num_workers=workers,
                       num_streams=2, batches_per_epoch=5)
        results.append(run_epochs(build_train_dataloader(cfg, phase_fn=lambda m: "consistency" if m % 3 else
                                                          "detail"), epochs=2))
    main, workers = results
    assert [b["micro_batch"] for b in workers] == list(range(10))
    for a, b in zip(main, workers, strict=True):
        assert a["key"] == b["key"] and a["kind"] == b["kind"]
        assert torch.equal(a["hr"], b["hr"]) and torch.equal(a["lq"], b["lq"])


def test_worker_micro_batches_cover_each_epoch_exactly():
    for n, workers in [(5, 2), (6, 3), (4, 0), (7, 4)]:
        got = sorted(m for w in range(max(1, workers)) for m in worker_micro_batches(10, 1, n, w, workers))
        assert got == list(range(10 + n, 10 + 2 * n))


def test_resume_count_draws_a_fresh_stream(two_sources):
    root, _, _ = two_sources
    cfg = make_cfg(root / "video", batches_per_epoch=4)
    keys = [[k for b in build_train_dataloader(cfg, phase_fn=always("consistency"), phases=["consistency"],
                                                  resume_count=r) for k in b["key"]] for r in (0, 0, 1)]
    assert keys[0] == keys[1] and keys[0] != keys[2]


def test_synthetic_backend_is_a_pure_function_of_seed_rank_and_index():
    cfg = DataConfig(backend="synthetic", crop_size=32, batch_size=2, seed=3)
    a = SyntheticBatchBuilder(cfg, rank=0, phase_fn=always("detail")).build(5)
    b = SyntheticBatchBuilder(cfg, rank=0, phase_fn=always("detail")).build(5, epoch=9)
    other_rank = SyntheticBatchBuilder(cfg, rank=1, phase_fn=always("detail")).build(5)
    other_index = SyntheticBatchBuilder(cfg, rank=0, phase_fn=always("detail")).build(6)
    assert torch.equal(a["hr"], b["hr"]) and torch.equal(a["lq"], b["lq"])
    assert not torch.equal(a["hr"], other_rank["hr"]) and not torch.equal(a["hr"], other_index["hr"])
    assert a["hr"].shape == (2, 3, 3, 32, 32) and a["lq"].shape == (2, 3, 3, 8, 8)
    assert a["kind"] == ["image"] * 2
    hr = to_uint8(a["hr"][0])
    down = np.stack([cv2.resize(f, (8, 8), interpolation=cv2.INTER_AREA) for f in hr])
    np.testing.assert_array_equal(down, to_uint8(a["lq"][0]))
    assert not np.array_equal(hr[0], hr[1]) or not np.array_equal(hr[1], hr[2])  # frames move


def test_config_rejects_streams_not_multiple_of_workers():
    with pytest.raises(ConfigError, match="num_streams"):
        DataConfig(num_workers=2, num_streams=3)
