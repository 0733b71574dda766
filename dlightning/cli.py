"""The ``dlightning`` command line: one table of verbs, one error path.

Each verb is a row of :data:`VERBS`: its name, its help, the function that adds its arguments and the
function that runs it. A runner only translates the parsed arguments into a call of a plain function
in the verb's own module (``dlightning.train.fit``, ``dlightning.export.export_checkpoint``, ...),
imported when the verb runs, so ``dlightning --help`` stays fast. Every verb that reads a config takes
``--config FILE`` (repeatable; later files win) and trailing ``key=value`` overrides, e.g.
``dlightning fit --config configs/demo.yaml optim.lr=1e-4 data.sources.0.path=/data/reds``.

Bad input (a config error, a missing weight file) ends with a one-line message naming the problem and
the fix, exit code 2 and no traceback; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from dlightning.errors import ConfigError, MissingWeightsError
from dlightning.utils.logging import get_logger

log = get_logger(__name__)

USAGE_ERROR = 2
"""Exit code of every error caused by the user's input (``shards verify`` exits 1 for a damaged shard set)."""


@dataclass(frozen=True)
class Verb:
    """One ``dlightning`` subcommand."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ------------------------------------------------------------------------------------------ arguments
def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", action="append", default=[], help="YAML config file (repeatable)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-4 data.sources.0.path=X")


def _fit_args(p: argparse.ArgumentParser) -> None:
    _config_args(p)
    p.add_argument("--fresh", action="store_true", help="refuse to resume: start from scratch in an empty run_dir")


def _submit_args(p: argparse.ArgumentParser) -> None:
    _config_args(p)
    p.add_argument("--dry-run", action="store_true", help="write the run folder and script, do not submit")


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo_run", help="folder for shards, run, export and video")
    p.add_argument("overrides", nargs="*", help="key=value overrides for the demo training config")


def _validate_args(p: argparse.ArgumentParser) -> None:
    _config_args(p)
    p.add_argument("--checkpoint", required=True,
                   help="a .ckpt file, a DeepSpeed checkpoint folder, a run folder (its newest checkpoint), or "
                   "a merged export folder (then --out is needed)")
    p.add_argument("--out", default=None, help="folder to write validation/step-XXXXXXXX/ into (default "
                   "trainer.run_dir)")
    p.add_argument("--lq-dir", default=None, help="overrides validation.lq_dir")
    p.add_argument("--gt-dir", default=None, help="overrides validation.gt_dir")


_EXPORT_VALUES = {"scale_consistency": 1.0, "scale_detail": 1.0, "dtype": "fp32", "color_fix": "adain", "prompt": ""}
"""Export options with a value, and their defaults (also how the model card's command line is rebuilt)."""
_EXPORT_FLAGS = ("consistency_only", "adapters", "link_base", "overwrite", "wandb_artifact")


def _export_args(p: argparse.ArgumentParser) -> None:
    p.description = ("Write a merged model folder that diffusers loads on its own (model_index.json, the pipeline "
                     "code, a model card), or with --adapters the LoRA-only adapters. With --checkpoint the model "
                     "comes from the checkpoint's stored config; --config files and key=value overrides may change "
                     "only its local paths (model.pretrained_path, model.cfr.spynet_path), anything else is "
                     "refused (exit 2). With --reference-pkl they describe the base model.")
    _config_args(p)
    p.add_argument("--checkpoint", help="training checkpoint: a .ckpt file, a DeepSpeed checkpoint folder, or "
                   "a run folder (its newest valid checkpoint)")
    p.add_argument("--reference-pkl", help="the authors' model.pkl (needs --config or overrides for the base model)")
    p.add_argument("--out", required=True, help="export folder: new or empty, or one holding an export (with "
                   "--overwrite); written as OUT.tmp-<random>, then renamed")
    p.add_argument("--adapters", action="store_true", help="write the LoRA-only adapters (diffusers LoRA files of "
                   "both families, the 8-channel conv_in, CFR) instead of the merged model")
    p.add_argument("--consistency-only", action="store_true", help="fuse only C-LoRA (D scale 0)")
    p.add_argument("--wandb-artifact", action="store_true", help="also log the export as a model artifact of the "
                   "checkpoint's W&B training run (needs --checkpoint inside a run folder that logged to W&B)")
    p.add_argument("--scale-consistency", type=float, default=_EXPORT_VALUES["scale_consistency"])
    p.add_argument("--scale-detail", type=float, default=_EXPORT_VALUES["scale_detail"])
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=_EXPORT_VALUES["dtype"])
    p.add_argument("--link-base", action="store_true", help="sd21: store the base path instead of copies")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export in OUT; a folder that "
                   "holds anything else is refused even so (export never deletes files that are not an export)")
    p.add_argument("--color-fix", choices=["adain", "wavelet", "none"], default=_EXPORT_VALUES["color_fix"])
    p.add_argument("--prompt", default=_EXPORT_VALUES["prompt"], help="default prompt stored in the export")


def _upscale_args(p: argparse.ArgumentParser) -> None:
    p.description = ("OUT is a video when it has a video suffix (.mp4, .mkv, ...), else a folder of PNG "
                     "frames (frame_000000.png, ...); a frame-folder input always gives a frame folder and a "
                     "folder of videos gives a folder of OUT/<stem>.mp4. OUT is never the input, never contains "
                     "it and never lies inside an input folder. Each output is written as a temporary sibling "
                     "(OUT.tmp-<random>) and renamed when complete; an error, Ctrl-C or SIGTERM removes it.")
    p.add_argument("input", help="video file, folder of frames, or folder of videos")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="video file or frame folder (see above)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output: a video file is replaced; in an existing frame folder only "
                   "the files named like upscale's frames (frame_NNNNNN.png) are replaced or removed, every "
                   "other file stays. Without it an existing video or non-empty folder is refused")
    p.add_argument("--model", required=True, help="export folder written by `dlightning export`")
    p.add_argument("--batch-windows", type=int, help="(previous, current) windows per UNet call (4)")
    p.add_argument("--tile-size", type=int, help="latent tile side (96)")
    p.add_argument("--tile-overlap", type=int, help="latent tile overlap (32)")
    p.add_argument("--vae-tile-size", type=int, help="pixel tile of the tiled VAE, 0 = off (1536)")
    p.add_argument("--vae-tiling", choices=["shared_norm", "diffusers"],
                   help="shared_norm: tiles use whole-frame GroupNorm statistics (default); diffusers: its tiling")
    p.add_argument("--vae-tile-padding", type=int, help="latent margin around each VAE tile (11)")
    p.add_argument("--color-fix", choices=["adain", "wavelet", "none"], help="default: the export's")
    p.add_argument("--prompt", help="default: the export's")
    p.add_argument("--seed", type=int, help="seed of sampled VAE latents (42)")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--device", help="auto: cuda when available")
    p.add_argument("--max-frames", type=int, help="0 = all")
    p.add_argument("--min-short-side", type=int, help="LQ frames with a shorter side are bicubic-enlarged (128)")
    p.add_argument("--channels-last", action="store_true", default=None, help="channels-last UNet and VAE")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the UNet")
    p.add_argument("--reference-io", action="store_true", default=None,
                   help="the reference's PIL / uint8 pre- and post-processing (docs/EVALUATION.md)")
    p.add_argument("--prompt-model", help="local captioner folder (or a tagger's weights): per-video prompts")
    p.add_argument("--prompt-tagger", help="module:factory of a RAM / DAPE-compatible tagger plug-in")


def _shards_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="shards_command", required=True, metavar="{build,verify,demo}")
    build = sub.add_parser("build", help="build (or resume) a shard set from a config")
    _config_args(build)
    verify = sub.add_parser("verify", help="re-read every shard and check it against manifest.json")
    verify.add_argument("out_dir")
    verify.add_argument("--deep", action="store_true", help="also decode every frame and check its size")
    demo = sub.add_parser("demo", help="build a small real shard set from skimage photographs (offline)")
    demo.add_argument("out_dir")
    demo.add_argument("overrides", nargs="*", help="key=value overrides, e.g. workers=2")


# ------------------------------------------------------------------------------------------ runners
def _run_config(args: argparse.Namespace) -> int:
    from dlightning.config import load_config, local_path_problems, to_yaml

    cfg = load_config(args.config, args.overrides)
    sys.stdout.write(to_yaml(cfg))
    problems = local_path_problems(cfg)
    for problem in problems:
        log.error("%s", problem)
    return USAGE_ERROR if problems else 0


def _run_inspect(args: argparse.Namespace) -> int:
    from dlightning.config import load_config
    from dlightning.models.inspect import format_inspection, inspect_model

    sys.stdout.write(format_inspection(inspect_model(load_config(args.config, args.overrides).model)) + "\n")
    return 0


def _run_fit(args: argparse.Namespace) -> int:
    from dlightning.utils.signals import arm_preemption_signals

    arm_preemption_signals()  # before the heavy imports: a SLURM signal now must not kill the job
    from dlightning.config import load_config
    from dlightning.train import fit

    fit(load_config(args.config, args.overrides), fresh=args.fresh)
    return 0


def _run_submit(args: argparse.Namespace) -> int:
    from dlightning.config import load_config
    from dlightning.train import submit

    sys.stdout.write(f"{submit(load_config(args.config, args.overrides), dry_run=args.dry_run)}\n")
    return 0


def _run_validate(args: argparse.Namespace) -> int:
    from dlightning.validate import validate_checkpoint

    metrics = validate_checkpoint(args.config, args.overrides, args.checkpoint, out=args.out,
                                  lq_dir=args.lq_dir, gt_dir=args.gt_dir)
    for key, value in sorted(metrics.items()):
        sys.stdout.write(f"{key}: {value:.6g}\n")
    return 0


INTERRUPTED = 130
"""Exit code after Ctrl-C (128 + SIGINT); SIGTERM gives 128 + SIGTERM."""


def _stopping_cleanly(verb: str, run: Callable[[], object]) -> int:
    """Run ``run`` with SIGTERM raising like Ctrl-C; either ends with one line and 128 + the signal.

    The verb's own ``except``/``finally`` blocks have removed its temporary outputs by then.
    """
    from dlightning.inference.pipeline import Terminated, sigterm_raises

    try:
        with sigterm_raises():
            run()
    except KeyboardInterrupt:
        log.error("%s interrupted (Ctrl-C); its unfinished output was removed", verb)
        return INTERRUPTED
    except Terminated as stop:
        log.error("%s stopped by SIGTERM; its unfinished output was removed", verb)
        return int(stop.code)
    return 0


def _run_export(args: argparse.Namespace) -> int:
    return _stopping_cleanly("export", lambda: _export(args))


def _export(args: argparse.Namespace) -> None:
    import os

    from dlightning.export import export_checkpoint, export_reference
    from dlightning.inference.config import ExportConfig

    cfg = ExportConfig(scale_consistency=args.scale_consistency,
                       scale_detail=0.0 if args.consistency_only else args.scale_detail,
                       dtype=args.dtype, link_base=args.link_base, overwrite=args.overwrite,
                       color_fix=args.color_fix, prompt=args.prompt, adapters=args.adapters)
    made_by = {"command": _export_command(args), "workdir": os.getcwd()}
    if args.reference_pkl and args.checkpoint:
        raise ConfigError("give --checkpoint or --reference-pkl, not both")
    run_dir = _artifact_run_dir(args) if args.wandb_artifact else None
    if args.reference_pkl:
        from dlightning.config import load_config

        if not args.config and not args.overrides:
            raise ConfigError("--reference-pkl needs --config CFG (or model.* overrides): its model section "
                              "describes the base model")
        model = load_config(args.config, args.overrides).model
        export_reference(args.reference_pkl, model, args.out, cfg, **made_by)
    elif args.checkpoint:
        export_checkpoint(args.checkpoint, args.out, cfg, model_config=_stored_model(args.config, args.overrides),
                          **made_by)
        if run_dir is not None:
            from dlightning.config import load_config
            from dlightning.contracts.run_layout import CONFIG_FILE
            from dlightning.tracking.artifacts import log_export_artifact

            logging_cfg = load_config([str(run_dir / CONFIG_FILE)]).logging
            if log_export_artifact(args.out, run_dir, logging_cfg) is None:
                log.warning("--wandb-artifact: the run %s does not log to W&B; no artifact written", run_dir)
    else:
        raise ConfigError("give --checkpoint CKPT (or --reference-pkl model.pkl --config CFG)")


def _artifact_run_dir(args: argparse.Namespace):
    """The training run folder of ``--checkpoint`` for ``--wandb-artifact``, checked before any work."""
    from pathlib import Path

    from dlightning.contracts.run_layout import CHECKPOINTS, CONFIG_FILE

    if not args.checkpoint:
        raise ConfigError("--wandb-artifact needs --checkpoint (the export is logged to that training run)")
    given = Path(args.checkpoint).resolve()
    run_dir = given.parent.parent if given.parent.name == CHECKPOINTS else given
    if not (run_dir / CONFIG_FILE).is_file():
        raise ConfigError(f"--wandb-artifact: {run_dir} is not a run folder (no {CONFIG_FILE}); pass a checkpoint "
                          f"inside RUN/{CHECKPOINTS}/ or the run folder itself")
    return run_dir


def _stored_model(files: list[str], overrides: list[str]):
    """How export builds a checkpoint's model: its stored section, with ``files`` and ``overrides`` applied
    on top (they may change only local paths), or None when neither is given."""
    if not files and not overrides:
        return None

    def resolve(stored: dict):
        from dlightning.config import RootConfig
        from dlightning.contracts import config_io
        from dlightning.export import check_stored_config_changes

        base = config_io.from_container(stored, RootConfig)
        given = config_io.load_config(files, overrides, cls=RootConfig, base=base)
        check_stored_config_changes(config_io.to_container(base), config_io.to_container(given))
        return given.model

    return resolve


def _export_command(args: argparse.Namespace) -> str:
    """The export command line of ``args`` (options at their defaults left out), for the model card."""
    import shlex

    parts = ["dlightning", "export"]
    for file in args.config:
        parts += ["--config", file]
    for option in ("checkpoint", "reference_pkl", "out"):
        if getattr(args, option):
            parts += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    parts += [f"--{flag.replace('_', '-')}" for flag in _EXPORT_FLAGS if getattr(args, flag)]
    for option, default in _EXPORT_VALUES.items():
        if getattr(args, option) != default:
            parts += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    return shlex.join([*parts, *args.overrides])


_UPSCALE_OPTIONS = ("batch_windows", "tile_size", "tile_overlap", "vae_tile_size", "color_fix", "prompt", "seed",
                    "dtype", "device", "max_frames", "min_short_side", "channels_last", "compile", "vae_tiling",
                    "vae_tile_padding", "reference_io", "prompt_model", "prompt_tagger")


def _run_upscale(args: argparse.Namespace) -> int:
    from dlightning.inference.config import UpscaleConfig
    from dlightning.inference.pipeline import upscale_exported

    # Options left unset keep UpscaleConfig's defaults (one place defines them).
    given = {name: getattr(args, name) for name in _UPSCALE_OPTIONS if getattr(args, name) is not None}
    cfg = UpscaleConfig(**given)
    return _stopping_cleanly("upscale", lambda: upscale_exported(args.model, args.input, args.output, cfg,
                                                                 overwrite=args.overwrite))


def _evaluate():
    """The ``evaluate`` verb's module (its composition root), imported when the verb is used."""
    from dlightning import evaluate

    return evaluate


def _run_demo(args: argparse.Namespace) -> int:
    from dlightning.demo import run_demo

    run_demo(args.out, overrides=args.overrides)
    return 0


def _run_shards(args: argparse.Namespace) -> int:
    from dlightning.shards.build import build_demo_shards, build_shards, verify_shards
    from dlightning.shards.config import load_prep_config

    if args.shards_command == "verify":
        return 0 if verify_shards(args.out_dir, deep=args.deep).ok else 1
    if args.shards_command == "demo":
        result = build_demo_shards(args.out_dir, args.overrides)
    else:
        result = build_shards(load_prep_config(args.config, args.overrides))
    log.info("built %d shard(s), reused %d, skipped %d input(s) -> %s", len(result.built), len(result.reused),
             len(result.skipped), result.out_dir)
    # The demo set is small and made for trying things out: check it end to end straight away.
    return 0 if args.shards_command == "build" or verify_shards(result.out_dir).ok else 1


VERBS: tuple[Verb, ...] = (
    Verb("fit", "train; resumes from the newest valid checkpoint in trainer.run_dir", _fit_args, _run_fit),
    Verb("validate", "validation metrics and side-by-side videos of a checkpoint", _validate_args, _run_validate),
    Verb("export", "fuse C/D-LoRA into a merged model folder diffusers loads on its own (or --adapters)",
         _export_args, _run_export),
    Verb("upscale", "upscale a video / frame folder / folder of videos", _upscale_args, _run_upscale),
    Verb("evaluate", "benchmark metrics of a model or a results folder: per-video CSV, Markdown, W&B tables",
         lambda p: _evaluate().add_arguments(p), lambda args: _evaluate().main(args)),
    Verb("shards", "build and verify training shards (also: python -m data_prep)", _shards_args, _run_shards),
    Verb("submit", "render the sbatch script into the run folder and submit it to SLURM", _submit_args,
         _run_submit),
    Verb("config", "print the resolved config, then check every local path it names (exit 2 if one is missing)",
         _config_args, _run_config),
    Verb("inspect", "LoRA targets and trainable parameter counts (meta device)", _config_args, _run_inspect),
    Verb("demo", "tiny end-to-end demo on generated shards (CPU, minutes)", _demo_args, _run_demo),
)


def _output_args(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """``--debug``, ``--quiet``, ``--verbose``: accepted before and after the verb."""
    default: dict[str, Any] = {"default": argparse.SUPPRESS} if suppress else {}
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error", **default)
    loud = parser.add_mutually_exclusive_group()
    loud.add_argument("--quiet", "-q", action="store_true", help="only warnings and errors", **default)
    loud.add_argument("--verbose", "-v", action="store_true", help="debug messages too", **default)


def build_parser(prog: str = "dlightning") -> argparse.ArgumentParser:
    """The argument parser with every verb of :data:`VERBS` registered."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    _output_args(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", required=True)
    for verb in VERBS:
        p = sub.add_parser(verb.name, help=verb.help, description=verb.help)
        verb.add_arguments(p)
        _output_args(p, suppress=True)  # a flag after the verb must not reset one given before it
        p.set_defaults(run=verb.run)
    return parser


def _set_verbosity(args: argparse.Namespace) -> None:
    """The level of dlightning's loggers, here and (through the environment) in every rank it starts."""
    level = "WARNING" if args.quiet else "DEBUG" if args.verbose else None
    if level is not None:
        os.environ["DLIGHTNING_LOG_LEVEL"] = level
        logging.getLogger("dlightning").setLevel(level)


def main(argv: Sequence[str] | None = None, *, prog: str = "dlightning") -> int:
    """Entry point of the ``dlightning`` console script; returns the exit code."""
    args = build_parser(prog).parse_args(argv)
    _set_verbosity(args)
    try:
        return int(args.run(args) or 0)
    except (ConfigError, MissingWeightsError) as err:
        if args.debug:
            raise
        log.error("%s", err)
        return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
