"""Registration point for subcommands implemented in their own modules (export, upscale, validate)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


def cmd_export(args: argparse.Namespace) -> int:
    """Fuse a checkpoint's LoRA families and write a merged model folder."""
    from dlightning.export import export_checkpoint, export_reference
    from dlightning.inference.config import ExportConfig

    cfg = ExportConfig(scale_consistency=args.scale_consistency,
                       scale_detail=0.0 if args.consistency_only else args.scale_detail,
                       dtype=args.dtype, link_base=args.link_base, overwrite=args.overwrite,
                       color_fix=args.color_fix, prompt=args.prompt)
    if args.reference_pkl:
        from dlightning.config import load_config

        if not args.config:
            raise SystemExit("--reference-pkl needs --config CFG (its model section describes the base model)")
        root = load_config(args.config, args.overrides)
        export_reference(args.reference_pkl, root.model, args.out, cfg)
    else:
        if not args.checkpoint:
            raise SystemExit("give --checkpoint CKPT (or --reference-pkl model.pkl --config CFG)")
        export_checkpoint(args.checkpoint, args.out, cfg)
    return 0


_UPSCALE_OPTIONS = ("batch_windows", "tile_size", "tile_overlap", "vae_tile_size", "color_fix", "prompt", "seed",
                    "dtype", "device", "max_frames", "min_short_side", "channels_last", "compile", "vae_tiling",
                    "vae_tile_padding")


def cmd_upscale(args: argparse.Namespace) -> int:
    """Upscale a video, a frame folder or a folder of videos with an exported model."""
    from dlightning.inference.config import UpscaleConfig
    from dlightning.inference.pipeline import upscale_exported

    # Options left unset keep UpscaleConfig's defaults (one place defines them).
    given = {name: getattr(args, name) for name in _UPSCALE_OPTIONS if getattr(args, name) is not None}
    cfg = UpscaleConfig(**given)
    upscale_exported(args.model, args.input, args.output, cfg)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """Run the validation callback's work once on a checkpoint."""
    from dlightning.training.validation import validate_checkpoint

    metrics = validate_checkpoint(args.config, args.overrides, args.checkpoint, out=args.out,
                                  lq_dir=args.lq_dir, gt_dir=args.gt_dir)
    for k, v in sorted(metrics.items()):
        sys.stdout.write(f"{k}: {v:.6g}\n")
    return 0


def _export_parser(sub: argparse._SubParsersAction, add_config_args: Callable) -> None:
    p = sub.add_parser("export", help="fuse C/D-LoRA into the UNet and write a merged model folder")
    add_config_args(p)
    p.add_argument("--checkpoint", help="training checkpoint: a .ckpt file, a DeepSpeed checkpoint folder, or "
                   "a run folder (its newest valid checkpoint)")
    p.add_argument("--reference-pkl", help="the authors' model.pkl (needs --config for the base model)")
    p.add_argument("--out", required=True, help="export folder (written as OUT.tmp, then renamed)")
    p.add_argument("--consistency-only", action="store_true", help="fuse only C-LoRA (D scale 0)")
    p.add_argument("--scale-consistency", type=float, default=1.0)
    p.add_argument("--scale-detail", type=float, default=1.0)
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--link-base", action="store_true", help="sd21: store the base path instead of copies")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export in OUT")
    p.add_argument("--color-fix", choices=["adain", "wavelet", "none"], default="adain")
    p.add_argument("--prompt", default="", help="default prompt stored in the export")
    p.set_defaults(func=cmd_export)


def _upscale_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("upscale", help="upscale a video / frame folder / folder of videos",
                       description="OUT is a video when it has a video suffix (.mp4, .mkv, ...), else a folder "
                                   "of PNG frames; a frame-folder input always gives a frame folder.")
    p.add_argument("input", help="video file, folder of frames, or folder of videos")
    p.add_argument("-o", "--output", required=True)
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
    p.set_defaults(func=cmd_upscale)


def register(sub: argparse._SubParsersAction, add_config_args: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add the optional subcommands to ``sub``; each module owns its arguments."""
    _export_parser(sub, add_config_args)
    _upscale_parser(sub)
    p = sub.add_parser("validate", help="validation metrics and side-by-side videos of a checkpoint")
    add_config_args(p)
    p.add_argument("--checkpoint", required=True,
                   help="a .ckpt file, a DeepSpeed checkpoint folder, or a run folder (its newest checkpoint)")
    p.add_argument("--out", default=None,
                   help="folder to write validation/step-XXXXXXXX/ into (default trainer.run_dir)")
    p.add_argument("--lq-dir", default=None, help="overrides validation.lq_dir")
    p.add_argument("--gt-dir", default=None, help="overrides validation.gt_dir")
    p.set_defaults(func=cmd_validate)
