"""Training loader: bad data skipped and counted, the global order (indexed access) and the streams
(stream access), aligned crops, phases, workers."""

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
from dlightning.data.order import OrderOrigin, SourcePlan
from dlightning.data.synthetic import SyntheticBatchBuilder
from dlightning.data.tar_index import index_source, scan_shard
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


@pytest.mark.parametrize(("access", "resampled"), [("indexed", False), ("stream", False), ("stream", True)])
def test_faulty_shards_yield_only_whole_samples_and_count_skips(faulty, access, resampled):
    folder, info = faulty
    cfg = make_cfg(folder, access=access, resampled=resampled, batches_per_epoch=10)
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
    cfg = make_cfg(root / "video", access="stream", resampled=True, batches_per_epoch=5)
    per_rank = [run_epochs(build_train_dataloader(cfg, rank=r, world_size=2, phase_fn=always("consistency"),
                                                  phases=["consistency"])) for r in (0, 1)]
    assert [len(b) for b in per_rank] == [5, 5]
    keys = [[k for b in batches for k in b["key"]] for batches in per_rank]
    assert keys[0] != keys[1]
    assert not torch.equal(per_rank[0][0]["hr"], per_rank[1][0]["hr"])


def test_split_by_node_gives_disjoint_shards(two_sources):
    root, video, _ = two_sources
    cfg = make_cfg(root / "video", access="stream", resampled=False, batches_per_epoch=6)
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
    cfg = make_cfg(root / "image", access="stream", resampled=False, num_streams=2)
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
        cfg = make_cfg(root / "image", access="stream", resampled=True, num_streams=2)  # 2 shards < 2 x 2
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
    cfg = make_cfg(root / "video", access="stream", batches_per_epoch=4)
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


# ----------------------------------------------------------------------------------------------
# Indexed access: the tar index and the global sample order


def keys_of(batches: list[dict]) -> list[str]:
    return [k for b in batches for k in b["key"]]


def test_tar_index_matches_tarfile_and_reads_the_stored_bytes(tmp_path):
    import tarfile

    import webdataset as wds

    clips = write_good_set(tmp_path / "set", name="set", kind="video", num_shards=1, per_shard=3, seed=5)
    long_key = "k" * 120  # longer than a ustar name field: tarfile writes a pax header, the fallback reads it
    with wds.TarWriter(str(tmp_path / "long.tar"), mtime=0) as sink:
        sink.write({"__key__": long_key, "meta.json": b"{}", "hr_000.png": b"x" * 700})
    for shard in (tmp_path / "set" / "set-000000.tar", tmp_path / "long.tar"):
        with tarfile.open(shard) as tar:
            expected = [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]
        scan = scan_shard(shard)
        assert scan.fault is None and scan.members == expected
    index = index_source([str(tmp_path / "set" / "set-000000.tar"), str(tmp_path / "long.tar")])
    assert index.keys == sorted(clips) + [long_key] and not index.faults
    sample = index.read(3)
    assert sample["__key__"] == long_key and sample["hr_000.png"] == b"x" * 700 and sample["meta.json"] == b"{}"
    first = index.read(0)
    hr, _, _ = clips[index.keys[0]]
    assert cv2.imdecode(np.frombuffer(first["hr_000.png"], np.uint8), cv2.IMREAD_COLOR)[..., ::-1].tolist() == \
        hr[0].tolist()


def test_tar_index_turns_damage_into_fault_slots(faulty):
    folder, info = faulty
    index = index_source([str(folder / f"video-{i:06d}.tar") for i in range(4)])
    reasons = sorted(reason for reason, _ in index.faults.values())
    assert reasons == ["empty_shard", "tar_error"]  # the zero-byte shard; the shard cut inside a member
    assert set(info["valid"]) <= set(index.keys) and len(index) == 3 + 3 + 5 + 2


def test_indexed_epoch_reads_every_sample_once_in_a_fresh_order(two_sources):
    root, video, _ = two_sources  # 12 clips
    cfg = make_cfg(root / "video", batches_per_epoch=6)  # 6 x 2 clips = one epoch of the source
    epochs = run_epochs(build_train_dataloader(cfg, phase_fn=always("consistency"), phases=["consistency"]), 3)
    orders = [keys_of(epochs[i * 6:(i + 1) * 6]) for i in range(3)]
    for order in orders:
        assert sorted(order) == sorted(video)
    assert orders[0] != orders[1] and orders[1] != orders[2]
    again = run_epochs(build_train_dataloader(cfg, phase_fn=always("consistency"), phases=["consistency"]), 3)
    assert keys_of(again) == keys_of(epochs)  # a pure function of the seed


def test_indexed_ranks_split_each_global_batch(two_sources):
    root, video, _ = two_sources
    cfg = make_cfg(root / "video", batches_per_epoch=3)  # 2 ranks x 3 micro-batches x 2 clips = 12
    per_rank = [run_epochs(build_train_dataloader(cfg, rank=r, world_size=2, phase_fn=always("consistency"),
                                                  phases=["consistency"])) for r in (0, 1)]
    assert [len(b) for b in per_rank] == [3, 3]
    keys = [keys_of(b) for b in per_rank]
    assert not set(keys[0]) & set(keys[1]) and sorted(keys[0] + keys[1]) == sorted(video)


def test_indexed_batches_depend_on_the_global_batch_not_the_world_size(two_sources):
    """2 ranks x 1 clip and 1 rank x 2 clips read the same clips, crops and flips per micro-batch."""
    root, _, _ = two_sources
    mixed = dict(weights=[(1.0, 0.5), (0.0, 1.0)], batches_per_epoch=8)
    phase = lambda m: "consistency" if m % 3 else "detail"  # noqa: E731
    one = run_epochs(build_train_dataloader(make_cfg(root / "video", root / "image", batch_size=2, **mixed),
                                            phase_fn=phase))
    two = [run_epochs(build_train_dataloader(make_cfg(root / "video", root / "image", batch_size=1, **mixed),
                                             rank=r, world_size=2, phase_fn=phase)) for r in (0, 1)]
    for m, batch in enumerate(one):
        assert batch["key"] == two[0][m]["key"] + two[1][m]["key"]
        assert torch.equal(batch["hr"], torch.cat([two[0][m]["hr"], two[1][m]["hr"]]))
    assert {k for b in one for k in b["kind"]} == {"video", "image"}


def test_indexed_resume_continues_the_order_bit_for_bit(two_sources):
    """A loader started at micro-batch 7 (after any number of resumes, with other workers) yields the
    straight run's batches from 7 on."""
    root, _, _ = two_sources
    kwargs = dict(weights=[(1.0, 0.5), (0.0, 1.0)], batches_per_epoch=7)
    phase = lambda m: "consistency" if m % 3 else "detail"  # noqa: E731
    straight = run_epochs(build_train_dataloader(make_cfg(root / "video", root / "image", **kwargs),
                                                 phase_fn=phase), 2)
    resumed = run_epochs(build_train_dataloader(make_cfg(root / "video", root / "image", num_workers=2, **kwargs),
                                                phase_fn=phase, start_micro_batch=7, resume_count=3))
    for a, b in zip(straight[7:], resumed, strict=True):
        assert a["micro_batch"] == b["micro_batch"] and a["key"] == b["key"]
        assert torch.equal(a["hr"], b["hr"]) and torch.equal(a["lq"], b["lq"])


def test_indexed_faulty_set_is_the_same_with_workers_and_substitutes_bad_slots(faulty):
    folder, info = faulty
    runs = [run_epochs(build_train_dataloader(make_cfg(folder, num_workers=w, batches_per_epoch=7),
                                              phase_fn=always("consistency"), phases=["consistency"]))
            for w in (0, 2)]
    assert keys_of(runs[0]) == keys_of(runs[1])
    assert [b["skipped"] for b in runs[0]] == [b["skipped"] for b in runs[1]]
    assert set(keys_of(runs[0])) <= set(info["valid"])


def test_source_plan_counts_only_the_micro_batches_of_each_source(two_sources):
    root, _, _ = two_sources
    cfg = make_cfg(root / "video", root / "image", weights=[(1.0, 1.0), (0.0, 1.0)])
    plan = SourcePlan(cfg, lambda m: "consistency" if m < 3000 else "detail")
    sources = [plan.source(m) for m in range(5000)]
    assert set(sources[:3000]) == {0} and set(sources[3000:]) == {0, 1}
    for m in (0, 1, 1023, 1024, 2500, 4999):
        assert plan.counts_before(m).tolist() == [sources[:m].count(0), sources[:m].count(1)]
    origin = OrderOrigin().rebased(plan, 2, 4000)  # 2 clips per micro-batch up to 4000, then any other size
    assert list(origin.positions) == [2 * sources[:4000].count(0), 2 * sources[:4000].count(1)]
    assert origin.positions_at(plan, 3, 4100).tolist() == [
        origin.positions[s] + 3 * sources[4000:4100].count(s) for s in (0, 1)]


def test_tar_index_detects_a_cut_between_members_and_a_bad_header(tmp_path):
    write_good_set(tmp_path / "set", name="set", kind="video", num_shards=1, per_shard=3, seed=6)
    shard = tmp_path / "set" / "set-000000.tar"
    members = scan_shard(shard).members
    data = shard.read_bytes()
    cut = tmp_path / "cut.tar"  # ends right after the data of sample 1: no end-of-archive blocks
    second = [m for m in members if m[0].startswith("set_00_01.")]
    cut.write_bytes(data[: (second[-1][1] + second[-1][2] + 511) // 512 * 512])
    scan = scan_shard(cut)
    assert scan.fault is not None and scan.fault[0] == "tar_error" and len(scan.members) == len(members) * 2 // 3
    bad = tmp_path / "bad.tar"  # one flipped byte in the header of the first member of sample 1
    header = second[0][1] - 512
    bad.write_bytes(data[:header] + bytes([data[header] ^ 1]) + data[header + 1:])
    scan = scan_shard(bad)
    assert scan.fault is not None and "checksum" in scan.fault[1] and len(scan.members) == len(members) // 3
    index = index_source([str(cut), str(bad)])
    assert index.keys == ["set_00_00", "set_00_01", "", "set_00_00", ""] and index.num_samples == 3
