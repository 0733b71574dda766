"""The built-in tiny demo: real shards from bundled photographs, training, export, upscaling.

Everything runs offline on a CPU in minutes with a random-weight model of SD 2.1's architecture at
toy size, so it shows the pipeline working end to end, not a useful model.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

from dlightning.config import RootConfig, load_config
from dlightning.resources import shipped_config
from dlightning.utils.logging import get_logger

log = get_logger(__name__)

DEMO_CONFIG = "demo.yaml"
"""The shipped training config of the demo (package data, so an installed dlightning runs the demo)."""


def build_demo_shards(out: Path) -> dict[str, Path]:
    """Two shard sets from the skimage photographs: pan/zoom "video" clips and camera-path image clips."""
    from dlightning.shards.build import build_shards, verify_shards
    from dlightning.shards.config import demo_config

    sets = {}
    for kind in ("video", "image"):
        cfg = demo_config(str(out / kind))
        cfg.sources[0].demo_kinds = [kind]
        build_shards(cfg)
        if not verify_shards(out / kind).ok:
            raise RuntimeError(f"demo shard set {out / kind} failed verification")
        sets[kind] = out / kind
    return sets


def demo_training_config(out: Path, overrides: Sequence[str] = ()) -> RootConfig:
    """configs/demo.yaml with the shard and run paths under ``out``."""
    paths = [
        f"trainer.run_dir={out / 'run'}",
        f"data.sources=[{{path: '{out / 'shards' / 'video'}', weight_consistency: 1.0, weight_detail: 0.0}},"
        f" {{path: '{out / 'shards' / 'image'}', weight_consistency: 0.0, weight_detail: 1.0}}]",
        f"validation.shards={out / 'shards' / 'video'}",
    ]
    return load_config([shipped_config(DEMO_CONFIG)], [*paths, *overrides])


def run_demo(out: str | Path, overrides: Sequence[str] = ()) -> dict[str, Path]:
    """Build shards, train through both phases, export the merged model and upscale a sample video.

    Args:
        out: folder for everything the demo writes.
        overrides: ``key=value`` overrides of the demo training config.

    Returns:
        The paths of the shards, run folder, export and upscaled video.
    """
    from dlightning.train import fit
    from dlightning.training.probe import PhaseProbe

    out = Path(out).resolve()
    cfg = demo_training_config(out, overrides)  # fail on bad overrides before any work
    log.info("demo 1/4: building shards in %s", out / "shards")
    build_demo_shards(out / "shards")
    log.info("demo 2/4: training the tiny model (%d optimizer steps)", cfg.trainer.max_steps)
    probe = PhaseProbe()
    fit(cfg, callbacks=[probe])
    for r in probe.records:
        trend = "decreased" if r.end < r.start else "did NOT decrease"
        log.info("demo: %-11s phase, steps %3d-%3d: objective on a fixed batch %.4f -> %.4f (%s)", r.phase,
                 r.first_step, r.last_step, r.start, r.end, trend)
    result = {"shards": out / "shards", "run": out / "run"}
    result.update(_export_and_upscale(out, cfg))
    for name, path in result.items():
        log.info("demo output %-8s %s", name, path)
    return result


def write_demo_video(path: Path, *, frames: int = 12, size: tuple[int, int] = (48, 64), fps: int = 12) -> Path:
    """A short LQ clip (a slow pan over a bundled photograph, downscaled) to upscale in the demo."""
    import cv2
    from skimage import data as skdata

    from dlightning.inference.video_io import VideoWriter
    from dlightning.shards.camera_path import linear_pan_zoom_path, render_camera_path

    image = skdata.astronaut()
    hr = render_camera_path(image, linear_pan_zoom_path(frames, [-40, -20, 0, 0.5], [40, 20, 2, 0.55]),
                            (size[0] * 4, size[1] * 4))
    writer = VideoWriter(path, fps=Fraction(fps))
    for frame in hr:
        writer.write(cv2.resize(frame, (size[1], size[0]), interpolation=cv2.INTER_AREA))
    writer.close()
    return path


def _export_and_upscale(out: Path, cfg: RootConfig) -> dict[str, Path]:
    from dlightning.contracts.checkpoint_format import resolve_resume_checkpoint
    from dlightning.export import export_checkpoint
    from dlightning.inference.config import ExportConfig, UpscaleConfig
    from dlightning.inference.pipeline import upscale_exported

    ckpt = resolve_resume_checkpoint(cfg.trainer.run_dir)
    if ckpt is None:
        raise RuntimeError(f"no checkpoint in {cfg.trainer.run_dir} after training")
    log.info("demo 3/4: exporting %s", ckpt)
    export_dir = out / "export"
    export_checkpoint(ckpt, export_dir, ExportConfig(overwrite=True))
    log.info("demo 4/4: upscaling a sample video")
    sample = write_demo_video(out / "sample_lq.mp4")
    video = out / "upscaled.mp4"
    # The reference enlarges inputs below 128 px first; the demo's toy model is kept small instead.
    upscale_exported(export_dir, sample, video, UpscaleConfig(min_short_side=32), overwrite=True)  # the demo owns --out
    return {"export": export_dir, "sample": sample, "video": video}
