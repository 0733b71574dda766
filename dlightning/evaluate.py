"""``dlightning evaluate``: score a model (export or checkpoint) or a folder of results on a benchmark set.

Composition root: reads the config (``evaluate``, ``upscale`` and ``logging`` sections, docs/EVALUATION.md),
plans the run (protocol, folders, pairing, weight files: every check before any model loads), upscales
the LQ clips with the model when one is given, scores, and writes ``per_video.csv``, ``summary.csv``,
``table.md`` and the W&B tables. ``--table`` instead merges several methods' ``summary.csv`` into the
papers' benchmark table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from dlightning.errors import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``dlightning evaluate``."""
    p.add_argument("--config", "-c", action="append", default=[], help="YAML config file (repeatable)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. evaluate.protocol=reds4 "
                   "evaluate.weights.musiq=/w/musiq_koniq_ckpt-e95806b9.pth")
    p.add_argument("--lq", help="folder of LQ clips (videos or frame folders), upscaled by --model/--checkpoint")
    p.add_argument("--gt", help="folder of GT clips, paired with the others by name (full-reference metrics)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="export folder written by `dlightning export`")
    src.add_argument("--checkpoint", help="training checkpoint (.ckpt, DeepSpeed folder, or run folder)")
    src.add_argument("--results", help="folder of already upscaled clips to score (another method's outputs)")
    p.add_argument("--out", "-o", help="folder for the reports (and the upscaled clips); with --table, the "
                   "Markdown file (default: print it)")
    p.add_argument("--protocol", help="shortcut for evaluate.protocol: videolq | reds4 | udm10 | spmcs | youhq40")
    p.add_argument("--name", help="method name in summary.csv (default: the results or output folder name)")
    p.add_argument("--reference-io", action="store_true", default=None,
                   help="the reference's PIL / uint8 pre- and post-processing (upscale.reference_io)")
    p.add_argument("--prompt-model", help="local captioner or tagger for per-video prompts (upscale.prompt_model)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier evaluation in --out")
    p.add_argument("--table", nargs="+", metavar="[NAME=]CSV",
                   help="write the benchmark table of these summary.csv files (methods as columns) and stop")


def _overrides(args: argparse.Namespace) -> list[str]:
    extra = list(args.overrides)
    if args.protocol:
        extra.append(f"evaluate.protocol={args.protocol}")
    if args.reference_io:
        extra.append("upscale.reference_io=true")
    if args.prompt_model:
        extra.append(f"upscale.prompt_model={args.prompt_model}")
    return extra


def _table(args: argparse.Namespace) -> str:
    from dlightning.evaluation.table import benchmark_table, read_results

    results = [r for spec in args.table for r in read_results(spec)]
    text = benchmark_table(results)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    return text


def _upscaler_factory(args: argparse.Namespace):
    """``UpscaleConfig -> Upscaler`` of the model named by ``--model`` or ``--checkpoint``."""
    from dlightning.inference.pipeline import Upscaler, resolve_device, resolve_dtype

    def factory(cfg):
        device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, device)
        if args.model:
            from dlightning.contracts.export_format import read_metadata
            from dlightning.inference.exported import load_exported

            meta = read_metadata(args.model)
            model = load_exported(args.model, device=device, dtype=dtype)
            return Upscaler(model, cfg, color_fix_default=meta.get("color_fix", "adain"),
                            prompt_default=meta.get("prompt", ""))
        from dlightning.contracts.checkpoint_format import read_training_checkpoint
        from dlightning.models.restore import restore_generator

        # The checkpoint's stored model section builds it (its local paths as when it was trained).
        gen = restore_generator(read_training_checkpoint(args.checkpoint)).to(device=device, dtype=dtype)
        return Upscaler(gen, cfg)

    return factory


def run(args: argparse.Namespace) -> dict[str, Any] | str:
    """Run ``dlightning evaluate`` for parsed ``args``; returns the scores (or the table text)."""
    if args.table:
        return _table(args)
    from dlightning.contracts import config_io
    from dlightning.evaluation.config import EvaluateRoot
    from dlightning.evaluation.runner import plan_evaluation, score_results, upscale_clips

    if not args.out:
        raise ConfigError("give --out FOLDER for the reports")
    has_model = bool(args.model or args.checkpoint)
    if has_model and not args.lq:
        raise ConfigError("--model / --checkpoint upscale the LQ clips: pass --lq LQ_FOLDER")
    if not has_model and not args.results:
        raise ConfigError("give --model EXPORT, --checkpoint CKPT or --results FOLDER to evaluate")
    root = config_io.load_config(args.config, _overrides(args), cls=EvaluateRoot)
    plan = plan_evaluation(root.evaluate, args.out, lq=args.lq, gt=args.gt, results=args.results,
                           method=args.name, overwrite=args.overwrite)
    if has_model:
        upscale_clips(plan, _upscaler_factory(args), root.upscale)
    return score_results(plan, root.evaluate, logging_cfg=root.logging, config=config_io.to_container(root))


def main(args: argparse.Namespace) -> int:
    """The verb's runner: prints the mean metrics (or the table) and returns the exit code."""
    result = run(args)
    if isinstance(result, str):
        if not args.out:
            sys.stdout.write(result)
        return 0
    for key, value in result["mean"].items():
        sys.stdout.write(f"{key}: {value:.6g}\n")
    sys.stdout.write(f"wrote {result['files']['per_video']}, {result['files']['summary']}, "
                     f"{result['files']['table']}\n")
    return 0
