"""One evaluation: clips in, per-video and mean metrics out (CSV, Markdown, W&B).

:func:`plan_evaluation` resolves the protocol and checks the folders, the pairing and every metric's
weight file (cheap, before any model or network is built); :func:`upscale_clips` runs a model over the
LQ clips into lossless frame folders; :func:`score_results` computes the metrics and writes the reports.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dlightning.errors import ConfigError
from dlightning.evaluation.config import DEFAULT_METRICS, EvaluateConfig
from dlightning.evaluation.dataset import list_clips, pair_clips, read_clip
from dlightning.evaluation.protocols import get_protocol
from dlightning.evaluation.report import log_wandb_tables, markdown_table, write_csv
from dlightning.inference.config import UpscaleConfig
from dlightning.inference.video_io import VideoSource
from dlightning.metrics.registry import metric_spec
from dlightning.metrics.suite import MetricSuite, mean_over_clips
from dlightning.metrics.weights import require_weight
from dlightning.utils.logging import get_logger

log = get_logger(__name__)

PER_VIDEO, SUMMARY, TABLE, RESULTS = "per_video.csv", "summary.csv", "table.md", "results"


@dataclass
class EvaluationPlan:
    """What one evaluation will do, checked before anything heavy."""

    metrics: list[str]
    crop_border: int
    max_frames: int
    color_fix: str | None
    lq: dict[str, VideoSource] | None
    gt: dict[str, VideoSource] | None
    results: dict[str, VideoSource] | None
    """The clips to score (None until a model has upscaled the LQ clips)."""
    out_dir: Path
    method: str


def _settings(cfg: EvaluateConfig, has_gt: bool) -> tuple[list[str], int, int, str | None]:
    protocol = get_protocol(cfg.protocol) if cfg.protocol else None
    if protocol is not None and protocol.needs_gt and not has_gt:
        raise ConfigError(f"evaluate.protocol={protocol.name} compares with GT frames: pass --gt GT_FOLDER")
    if cfg.metrics is not None:
        metrics = list(cfg.metrics)
    elif protocol is not None:
        metrics = list(protocol.metrics)
    elif has_gt:
        metrics = list(DEFAULT_METRICS)
    else:
        raise ConfigError("without GT, choose no-reference metrics (evaluate.metrics=[niqe,brisque,...]) or a "
                          "protocol (evaluate.protocol=videolq)")
    def pick(key: str, default: int) -> int:
        """The explicit setting, else the protocol's, else ``default``."""
        if getattr(cfg, key) is not None:
            return getattr(cfg, key)
        return getattr(protocol, key) if protocol is not None else default

    color_fix = cfg.color_fix if cfg.color_fix is not None else protocol.color_fix if protocol else None
    return metrics, int(pick("crop_border", 0)), int(pick("max_frames", 0)), color_fix


def plan_evaluation(cfg: EvaluateConfig, out_dir: str | Path, *, lq: str | None = None, gt: str | None = None,
                    results: str | None = None, method: str | None = None, overwrite: bool = False,
                    ) -> EvaluationPlan:
    """Resolve the settings and check inputs, outputs and weight files.

    Args:
        cfg: The ``evaluate`` section.
        out_dir: Where the reports (and upscaled clips) go.
        lq: LQ folder (needed to upscale with a model; optional with ``results``).
        gt: GT folder (needed by full-reference metrics).
        results: Folder of already-upscaled clips; None when a model upscales ``lq``.
        method: Name of the evaluated method in the summary (default: the results or output folder name).
        overwrite: Replace an earlier evaluation's reports and upscaled clips in ``out_dir``.

    Raises:
        ConfigError: A bad setting, a missing folder or clip, an output that exists without ``overwrite``.
        MissingWeightsError: A metric's weight file is missing.
    """
    if lq is None and results is None:
        raise ConfigError("give the LQ folder (with --model or --checkpoint) or --results RESULTS_FOLDER")
    metrics, crop, max_frames, color_fix = _settings(cfg, gt is not None)
    specs = [metric_spec(m) for m in metrics]
    fr = [s.name for s in specs if s.kind == "fr"]
    if fr and gt is None:
        raise ConfigError(f"metrics {fr} compare with GT frames: pass --gt GT_FOLDER or drop them")
    for spec in specs:
        for entry in spec.weights:
            require_weight(getattr(cfg.weights, entry), f"evaluate.weights.{entry}", entry)
    lq_clips = list_clips(lq, "LQ") if lq is not None else None
    gt_clips = list_clips(gt, "GT") if gt is not None else None
    res_clips = list_clips(results, "results") if results is not None else None
    names = res_clips if res_clips is not None else lq_clips
    if gt_clips is not None:
        pair_clips(names, gt_clips, f"GT folder {gt}")
    if res_clips is not None and lq_clips is not None:
        pair_clips(lq_clips, res_clips, f"results folder {results}")
    out = Path(out_dir)
    existing = [out / n for n in (PER_VIDEO, SUMMARY, TABLE) if (out / n).exists()]
    if results is None and (out / RESULTS).exists():
        existing.append(out / RESULTS)
    if existing and not overwrite:
        raise ConfigError(f"{existing[0]} exists from an earlier evaluation; pass --overwrite or another --out")
    method = method or (Path(results).name if results is not None else out.name)
    return EvaluationPlan(metrics, crop, max_frames, color_fix, lq_clips, gt_clips, res_clips, out, method)


def upscale_clips(plan: EvaluationPlan, upscaler_factory, upscale_cfg: UpscaleConfig) -> None:
    """Upscale every LQ clip of ``plan`` into ``<out>/results/<clip>/`` (PNG frames) and point the plan at them.

    Args:
        upscaler_factory: ``UpscaleConfig -> Upscaler`` (the model is bound by the caller).
        upscale_cfg: Inference settings; the plan's frame count and colour fix replace its own.
    """
    import shutil

    from dlightning.inference.video_io import probe_frames

    assert plan.lq is not None
    changes: dict[str, Any] = {"max_frames": plan.max_frames}
    if plan.color_fix is not None:
        changes["color_fix"] = plan.color_fix
    upscaler = upscaler_factory(dataclasses.replace(upscale_cfg, **changes))
    root = plan.out_dir / RESULTS
    if root.exists():
        shutil.rmtree(root)  # plan_evaluation refused it unless --overwrite
    root.mkdir(parents=True)
    clips = {}
    for name, source in plan.lq.items():
        target = upscaler.upscale_source(source, root / name)
        clips[name] = probe_frames(target)
    plan.results = clips


def score_results(plan: EvaluationPlan, cfg: EvaluateConfig, *, logging_cfg=None, config: dict | None = None,
                  ) -> dict[str, Any]:
    """Score every result clip, write ``per_video.csv``, ``summary.csv``, ``table.md`` (and W&B tables).

    Returns:
        ``{"per_video": [rows], "mean": {metric: value}, "files": {...}, "wandb_run": id or None}``.
    """
    assert plan.results is not None
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    suite = MetricSuite(plan.metrics, cfg.weights, crop_border=plan.crop_border, device=device,
                        lpips_net=cfg.lpips_net, raft_size=cfg.raft_size, batch_frames=cfg.batch_frames)
    rows = []
    for name, source in plan.results.items():
        out = read_clip(source, plan.max_frames)
        gt = read_clip(plan.gt[name], plan.max_frames) if plan.gt is not None else None
        if gt is not None and out.shape != gt.shape:
            raise ConfigError(f"clip {name}: result {tuple(out.shape)} and GT {tuple(gt.shape)} differ (frames, "
                              "channels, height, width); set evaluate.max_frames or check the scale")
        values = suite.score(out, gt)
        rows.append({"clip": name, **values})
        log.info("%s: %s", name, ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
    mean = mean_over_clips(rows, plan.metrics)
    broken = [k for k, v in mean.items() if math.isnan(v) and not k.startswith("ewarp")]
    if broken:
        log.warning("metrics %s are NaN on some clip (see %s)", broken, PER_VIDEO)
    columns = ["clip", *plan.metrics]
    files = {
        "per_video": write_csv(plan.out_dir / PER_VIDEO, [*rows, {"clip": "mean", **mean}], columns),
        "summary": write_csv(plan.out_dir / SUMMARY, [{"method": plan.method, **mean}], ["method", *plan.metrics]),
    }
    files["table"] = plan.out_dir / TABLE
    files["table"].write_text(markdown_table(rows, plan.metrics, mean), encoding="utf-8")
    run_id = None
    if cfg.wandb and logging_cfg is not None:
        run_id = log_wandb_tables(logging_cfg, plan.out_dir, rows, plan.metrics, mean, config or {})
    return {"per_video": rows, "mean": mean, "files": files, "wandb_run": run_id}
