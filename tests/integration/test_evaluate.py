"""``dlightning evaluate`` end to end on a small LQ / GT set made here: results folders and models, the
CSV / Markdown / W&B outputs, the benchmark table, and the errors that come before any heavy work."""

from __future__ import annotations

import copy
import csv
import json
import math

import cv2
import numpy as np
import pytest
from helpers.media import randomized_generator, smooth_frames, write_video
from helpers.metric_weights import brisque_params, niqe_params
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from dlightning.cli import main

GT_SIZE, FRAMES = (96, 104), 3
OFFLINE = ["logging.wandb_mode=offline", "logging.project=dlightning-test"]


def _save_frames(folder, frames):
    folder.mkdir(parents=True)
    for i, f in enumerate(frames):
        cv2.imwrite(str(folder / f"{i:08d}.png"), cv2.cvtColor(f, cv2.COLOR_RGB2BGR))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Two clips: GT frame folders, LQ as a video and as a frame folder, and a noisy 'result' of each."""
    root = tmp_path_factory.mktemp("evalset")
    rng = np.random.default_rng(0)
    clips = {}
    for k, name in enumerate(["clip_a", "clip_b"]):
        gt = smooth_frames(FRAMES, *GT_SIZE, seed=k)
        lq = [cv2.resize(f, (GT_SIZE[1] // 4, GT_SIZE[0] // 4), interpolation=cv2.INTER_AREA) for f in gt]
        res = [np.clip(f.astype(int) + rng.integers(-12, 13, f.shape), 0, 255).astype(np.uint8) for f in gt]
        _save_frames(root / "gt" / name, gt)
        _save_frames(root / "results" / name, res)
        if k == 0:
            (root / "lq").mkdir(exist_ok=True)
            write_video(root / "lq" / f"{name}.mp4", lq, fps=10)
        else:
            _save_frames(root / "lq" / name, lq)
        clips[name] = (gt, res)
    weights = root / "weights"
    weights.mkdir()
    return {"root": root, "clips": clips, "niqe": niqe_params(weights), "brisque": brisque_params(weights)}


def _rows(path):
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_results_folder_scores_match_skimage_and_write_csv_markdown_and_wandb(dataset, tmp_path, monkeypatch):
    from helpers.wandb_offline import offline_runs, read_offline_run

    monkeypatch.setenv("WANDB_SILENT", "true")
    root, out = dataset["root"], tmp_path / "eval"
    code = main(["evaluate", "--results", str(root / "results"), "--gt", str(root / "gt"), "--out", str(out),
                 "--name", "noisy", "evaluate.metrics=[psnr,ssim,psnr_y,ewarp_farneback]", *OFFLINE])
    assert code == 0
    rows = _rows(out / "per_video.csv")
    assert [r["clip"] for r in rows] == ["clip_a", "clip_b", "mean"]
    for row in rows[:2]:
        gt, res = dataset["clips"][row["clip"]]
        psnr = np.mean([peak_signal_noise_ratio(g, r, data_range=255) for g, r in zip(gt, res, strict=True)])
        ssim = np.mean([structural_similarity(g / 255, r / 255, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                              use_sample_covariance=False, data_range=1) for g, r in zip(gt, res,
                                                                                                         strict=True)])
        assert float(row["psnr"]) == pytest.approx(psnr, abs=1e-4)
        assert float(row["ssim"]) == pytest.approx(ssim, abs=1e-5)
        assert all(math.isfinite(float(row[k])) for k in ("ewarp_farneback", "psnr_y"))
    mean = rows[2]
    assert float(mean["psnr"]) == pytest.approx((float(rows[0]["psnr"]) + float(rows[1]["psnr"])) / 2)
    summary = _rows(out / "summary.csv")
    assert summary[0]["method"] == "noisy" and summary[0]["psnr"] == mean["psnr"]
    table = (out / "table.md").read_text()
    assert "| clip_a |" in table and "| **mean** |" in table
    assert "PSNR (Y) ↑" in table and "E*warp (Farneback) ↓" in table
    [folder] = offline_runs(out)
    [logged] = read_offline_run(folder).history
    assert logged["evaluate/per_video._type"] == logged["evaluate/mean._type"] == "table-file"
    table_file = json.loads((folder / "files" / logged["evaluate/per_video.path"]).read_text())
    assert table_file["columns"] == ["clip", "psnr", "ssim", "psnr_y", "ewarp_farneback"]
    assert [r[0] for r in table_file["data"]] == ["clip_a", "clip_b"]
    assert table_file["data"][0][1] == pytest.approx(float(rows[0]["psnr"]))


def test_benchmark_table_of_two_methods(dataset, tmp_path):
    root = dataset["root"]
    for name, folder in (("noisy", root / "results"), ("gt", root / "gt")):
        assert main(["evaluate", "--results", str(folder), "--gt", str(root / "gt"), "--out", str(tmp_path / name),
                     "evaluate.metrics=[psnr,ssim]", "evaluate.wandb=false"]) == 0
    table = tmp_path / "table.md"
    assert main(["evaluate", "--table", f"Ours={tmp_path / 'noisy' / 'summary.csv'}",
                 f"GT={tmp_path / 'gt' / 'summary.csv'}", "--out", str(table)]) == 0
    lines = table.read_text().splitlines()
    assert lines[:2] == ["| metric | Ours | GT |", "|---|---:|---:|"]
    ours = float(_rows(tmp_path / "noisy" / "summary.csv")[0]["psnr"])
    # GT against itself is best on both rows (PSNR infinite, SSIM 1): bold in the GT column only.
    assert lines[2] == f"| PSNR ↑ | {ours:.4f} | **inf** |"
    assert lines[3].startswith("| SSIM ↑ | 0.") and lines[3].endswith("| **1.0000** |")


@pytest.fixture(scope="module")
def gen():
    return randomized_generator()


@pytest.fixture(scope="module")
def export_dir(gen, tmp_path_factory):
    from dlightning.export import export_generator

    return export_generator(copy.deepcopy(gen), tmp_path_factory.mktemp("exp") / "model")


def test_upscale_reference_io_on_the_tiny_model_keeps_the_model_and_changes_only_the_io(gen):
    from dlightning.inference.config import UpscaleConfig
    from dlightning.inference.pipeline import Upscaler

    rng = np.random.default_rng(5)
    frames = [rng.integers(0, 256, (8, 10, 3), dtype=np.uint8) for _ in range(2)]
    fast = {"min_short_side": 0, "batch_windows": 2}
    ours = list(Upscaler(copy.deepcopy(gen), UpscaleConfig(**fast)).upscale_frames(frames))
    ref = list(Upscaler(copy.deepcopy(gen), UpscaleConfig(**fast, reference_io=True)).upscale_frames(frames))
    assert [f.shape for f in ref] == [(32, 40, 3)] * 2 == [f.shape for f in ours]
    diff = np.abs(np.stack(ref).astype(int) - np.stack(ours).astype(int))
    assert 0 < diff.mean() < 16  # the same model; only the resampling and the rounding differ


@pytest.mark.parametrize("reference_io", [False, True], ids=["dlightning_io", "reference_io"])
def test_model_upscales_the_lq_set_then_scores(dataset, export_dir, tmp_path, reference_io):
    root, out = dataset["root"], tmp_path / "eval"
    args = ["evaluate", "--model", str(export_dir), "--lq", str(root / "lq"), "--gt", str(root / "gt"),
            "--out", str(out), "evaluate.metrics=[psnr,ssim_y]", "evaluate.wandb=false", "upscale.min_short_side=0"]
    assert main(args + (["--reference-io"] if reference_io else [])) == 0
    for name in ("clip_a", "clip_b"):
        frames = sorted((out / "results" / name).glob("frame_*.png"))
        assert len(frames) == FRAMES
        assert cv2.imread(str(frames[0])).shape[:2] == GT_SIZE
    rows = _rows(out / "per_video.csv")
    assert len(rows) == 3 and all(math.isfinite(float(r["psnr"])) for r in rows)
    assert main(args) == 2  # an earlier evaluation is not replaced without --overwrite


def test_demo_sample_without_gt_no_reference_metrics(export_dir, tmp_path, dataset):
    pytest.importorskip("pyiqa")
    from dlightning.demo import write_demo_video

    sample = write_demo_video(tmp_path / "lq" / "sample_lq.mp4", frames=3, size=(24, 32))
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(export_dir), "--lq", str(sample.parent), "--out", str(out),
                 "evaluate.metrics=[niqe,brisque,ewarp_farneback]", f"evaluate.weights.niqe={dataset['niqe']}",
                 f"evaluate.weights.brisque={dataset['brisque']}", "evaluate.wandb=false",
                 "upscale.min_short_side=0"]) == 0
    [row, mean] = _rows(out / "per_video.csv")
    assert row["clip"] == "sample_lq" and math.isfinite(float(mean["niqe"]))


@pytest.mark.parametrize(("args", "message"), [
    (["evaluate.metrics=[musiq]"], "evaluate.weights.musiq is not set"),
    (["evaluate.protocol=reds4"], "pass --gt"),
    (["evaluate.protocol=vimeo"], "choose one of"),
    (["evaluate.metrics=[psnr]"], "pass --gt"),
    (["evaluate.metrics=[dover]"], "DOVER"),
])
def test_bad_input_is_one_line_exit_2_before_the_model_loads(args, message, dataset, tmp_path, caplog):
    # The model path does not exist: the error must come from the check, before any load is tried.
    code = main(["evaluate", "--model", str(tmp_path / "no_model"), "--lq", str(dataset["root"] / "lq"),
                 "--out", str(tmp_path / "eval"), *args])
    assert code == 2
    assert message in caplog.text
    assert not (tmp_path / "eval").exists()


def test_checkpoint_scores_like_its_merged_export(dataset, gen, export_dir, tmp_path):
    from helpers.media import tiny_model_config
    from helpers.run_checkpoint import write_run_checkpoint

    ckpt = write_run_checkpoint(copy.deepcopy(gen), tmp_path / "run", tiny_model_config())
    root = dataset["root"]
    common = ["--lq", str(root / "lq"), "--gt", str(root / "gt"), "evaluate.metrics=[psnr]", "evaluate.wandb=false",
              "upscale.min_short_side=0"]
    assert main(["evaluate", "--checkpoint", str(ckpt), "--out", str(tmp_path / "c"), *common]) == 0
    assert main(["evaluate", "--model", str(export_dir), "--out", str(tmp_path / "m"), *common]) == 0
    unmerged, merged = _rows(tmp_path / "c" / "per_video.csv"), _rows(tmp_path / "m" / "per_video.csv")
    for a, b in zip(unmerged, merged, strict=True):
        assert float(a["psnr"]) == pytest.approx(float(b["psnr"]), abs=0.05)  # merging changes only rounding
