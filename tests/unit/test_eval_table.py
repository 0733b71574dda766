"""The benchmark table (methods as columns, metrics as rows, best in bold) and the protocol presets."""

from __future__ import annotations

import pytest

from dlightning.errors import ConfigError
from dlightning.evaluation.protocols import PROTOCOLS, get_protocol
from dlightning.evaluation.table import benchmark_table, read_results
from dlightning.metrics.registry import METRICS


def test_best_is_bold_by_each_metrics_direction_ties_all_bold_missing_is_a_dash():
    results = [("A", {"psnr": 25.0, "lpips": 0.30, "musiq": 60.0}),
               ("B", {"psnr": 26.5, "lpips": 0.20, "musiq": 60.0}),
               ("C", {"psnr": 24.0, "lpips": 0.25})]
    lines = benchmark_table(results, digits=2).splitlines()
    assert lines[0] == "| metric | A | B | C |"
    assert lines[2] == "| PSNR ↑ | 25.00 | **26.50** | 24.00 |"
    assert lines[3] == "| LPIPS ↓ | 0.30 | **0.20** | 0.25 |"
    assert lines[4] == "| MUSIQ ↑ | **60.00** | **60.00** | - |"


def test_results_read_from_summary_and_per_video_csv(tmp_path):
    (tmp_path / "m1").mkdir()
    (tmp_path / "m1" / "summary.csv").write_text("method,psnr,niqe\nours,27.5,4.25\n")
    (tmp_path / "per_video.csv").write_text("clip,psnr\na,20.0\nb,22.0\nmean,21.0\n")
    assert read_results(str(tmp_path / "m1" / "summary.csv")) == [("ours", {"psnr": 27.5, "niqe": 4.25})]
    assert read_results(f"Other={tmp_path / 'per_video.csv'}") == [("Other", {"psnr": 21.0})]
    with pytest.raises(ConfigError, match="does not exist"):
        read_results(str(tmp_path / "missing.csv"))
    with pytest.raises(ConfigError, match="repeat"):
        benchmark_table([("x", {"psnr": 1.0}), ("x", {"psnr": 2.0})])


def test_protocols_name_only_known_metrics_and_fix_the_colour_space():
    for protocol in PROTOCOLS.values():
        assert set(protocol.metrics) <= set(METRICS), protocol.name
        fr = {m for m in protocol.metrics if METRICS[m].kind == "fr"}
        assert bool(fr) == protocol.needs_gt
    assert get_protocol("VideoLQ").metrics[:4] == ("musiq", "clipiqa", "niqe", "brisque")
    assert "psnr_y" in get_protocol("udm10").metrics and "psnr" not in get_protocol("udm10").metrics
    assert "psnr" in get_protocol("reds4").metrics and "psnr_y" not in get_protocol("reds4").metrics
    with pytest.raises(ConfigError, match="choose one of"):
        get_protocol("vid4")
