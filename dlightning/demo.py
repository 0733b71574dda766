"""The built-in tiny demo: real shards from bundled photographs, training, export, upscaling.

Everything runs offline on a CPU in minutes with a random-weight model of SD 2.1's architecture at
toy size, so it shows the pipeline working end to end, not a useful model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from dlightning.config import RootConfig, load_config
from dlightning.errors import ConfigError
from dlightning.utils.logging import get_logger

log = get_logger(__name__)

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def build_demo_shards(out: Path) -> dict[str, Path]:
    """Two shard sets from the skimage photographs: pan/zoom "video" clips and camera-path image clips."""
    from data_prep.cli import build, verify
    from dlightning.data.prep_config import demo_config

    sets = {}
    for kind in ("video", "image"):
        cfg = demo_config(str(out / kind))
        cfg.sources[0].demo_kinds = [kind]
        build(cfg)
        if verify(str(out / kind)) != 0:
            raise RuntimeError(f"demo shard set {out / kind} failed verification")
        sets[kind] = out / kind
    return sets


def demo_training_config(out: Path, overrides: Sequence[str] = ()) -> RootConfig:
    """configs/demo.yaml with the shard and run paths under ``out``."""
    if not DEMO_CONFIG.is_file():
        raise ConfigError(f"{DEMO_CONFIG} not found; run the demo from a checkout of the repository")
    paths = [
        f"trainer.run_dir={out / 'run'}",
        f"data.sources=[{{path: '{out / 'shards' / 'video'}', weight_consistency: 1.0, weight_detail: 0.0}},"
        f" {{path: '{out / 'shards' / 'image'}', weight_consistency: 0.0, weight_detail: 1.0}}]",
    ]
    return load_config([DEMO_CONFIG], [*paths, *overrides])


def run_demo(out: str | Path, overrides: Sequence[str] = ()) -> dict[str, Path]:
    """Build shards, train through both phases, export the merged model and upscale a sample video.

    Args:
        out: folder for everything the demo writes.
        overrides: ``key=value`` overrides of the demo training config.

    Returns:
        The paths of the shards, run folder, export and upscaled video.
    """
    from dlightning.training.run import fit

    out = Path(out).resolve()
    cfg = demo_training_config(out, overrides)  # fail on bad overrides before any work
    log.info("demo 1/4: building shards in %s", out / "shards")
    build_demo_shards(out / "shards")
    log.info("demo 2/4: training the tiny model (%d optimizer steps)", cfg.trainer.max_steps)
    fit(cfg)
    result = {"shards": out / "shards", "run": out / "run"}
    result.update(_export_and_upscale(out, cfg))
    for name, path in result.items():
        log.info("demo output %-8s %s", name, path)
    return result


def _export_and_upscale(out: Path, cfg: RootConfig) -> dict[str, Path]:
    from dlightning.export import export_checkpoint
    from dlightning.inference.demo_video import write_demo_video
    from dlightning.inference.pipeline import upscale_path
    from dlightning.training.checkpointing import resolve_resume_checkpoint

    ckpt = resolve_resume_checkpoint(cfg.trainer.run_dir)
    if ckpt is None:
        raise RuntimeError(f"no checkpoint in {cfg.trainer.run_dir} after training")
    log.info("demo 3/4: exporting %s", ckpt)
    export_dir = out / "export"
    export_checkpoint(ckpt, export_dir, overwrite=True)
    log.info("demo 4/4: upscaling a sample video")
    sample = write_demo_video(out / "sample_lq.mp4")
    video = out / "upscaled.mp4"
    upscale_path(sample, video, model=export_dir)
    return {"export": export_dir, "sample": sample, "video": video}
