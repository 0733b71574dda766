"""Video upscaling with a (merged or training) DLoRAL generator.

The frames-to-frames work is :class:`~dlightning.models.standalone.dloral_frames.WindowRunner`, the
standalone-safe runner every export's diffusers pipeline carries too; this module adds the package-only
parts: files and outputs, the shared-statistics VAE tiling, devices, ``channels_last`` and ``compile``.

Per video: every frame t is produced from the window (t - 1, t), frame 0 from (0, 0), as the generator
does. Windows are batched (``batch_windows`` per UNet call). Per frame (docs/METHOD.md 1.5, 7.4-7.6):

1. RGB uint8 -> [-1, 1]; a frame whose short side is below ``min_short_side`` is first bicubic-enlarged
   so that its short side equals it; then replicate-padded so that ``side * scale`` is a multiple of 8.
2. Generator pieces: bicubic x scale, VAE encode (tiled above ``vae_tile_size`` px: shared GroupNorm
   statistics by default, :mod:`~dlightning.inference.tiled_vae`, or diffusers' tiling), CFR + UNet
   (:meth:`denoise`, latent tiles with Gaussian blending when the latent area exceeds ``tile_size^2``;
   tile starts on the UNet's downsampling grid), x0 rule, VAE decode (tiled as the encode). Latent
   tiling and diffusers' VAE tiling approximate the whole-frame result; the shared-statistics VAE
   tiling matches it up to the receptive field beyond its padding (docs/INFERENCE.md has the numbers).
3. Colour fix against the bicubic-upsampled LQ, crop the padding, and resize to exactly
   ``scale x original size`` when the frame was enlarged.

Outputs (:func:`plan_outputs`, checked with the inputs and the frame sizes before the model loads):
an output is never the input, never contains it and never lies inside an input folder; an existing
output is refused unless ``overwrite``, and then only what upscale writes is replaced (the video
file, or the ``frame_NNNNNN.png`` files of a frame folder; other files stay). Every output is written
into a new temporary sibling and renamed when complete; an error, Ctrl-C or SIGTERM (with
:func:`sigterm_raises`) removes the temporary sibling.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from dlightning.errors import ConfigError
from dlightning.inference.config import UpscaleConfig
from dlightning.inference.prompting import build_prompter, peek_first, video_prompt
from dlightning.inference.reference_io import ReferenceWindowRunner
from dlightning.inference.tiled_vae import shared_norm_tiling
from dlightning.inference.video_io import (
    FRAME_NAME,
    FrameFolderWriter,
    InputError,
    VideoSource,
    VideoWriter,
    collect_inputs,
    is_video_path,
)
from dlightning.models.standalone.dloral_frames import (
    FrameSizeError,
    WindowRunner,
    WindowSettings,
    diffusers_vae_tiling,
    enlarged_size,
    processed_size,
)
from dlightning.utils.logging import get_logger

log = get_logger(__name__)


def resolve_device(name: str) -> torch.device:
    """``auto`` = CUDA when available, else CPU.

    Raises:
        ConfigError: a CUDA device is named but none is visible.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"upscale.device={name!r} but no CUDA GPU is visible; use --device cpu or auto")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` = bf16 on CUDA (fp16 without bf16 support), fp32 elsewhere."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


MAX_FRAME_SIDE = 16384
"""Largest frame side upscale processes or writes (libx264 refuses wider frames)."""
MAX_FRAME_PIXELS = 1 << 27
"""Largest processed frame area (134 megapixels: a 3840x2160 input at x4 fits; 16384x16384 does not)."""


def check_frame_sizes(sources: list[VideoSource], scale: int, min_short_side: int) -> None:
    """Refuse sources whose processed frames exceed :data:`MAX_FRAME_SIDE` or :data:`MAX_FRAME_PIXELS`.

    Cheap (the sizes come from the probe), so it runs before the model loads.

    Raises:
        ConfigError: The processed frame of a source is too large; the message names the fix.
    """
    for source in sources:
        if source.size is None:
            continue
        height, width = source.size
        ph, pw = processed_size(height, width, scale, min_short_side)
        if max(ph, pw) <= MAX_FRAME_SIDE and ph * pw <= MAX_FRAME_PIXELS:
            continue
        enlarged = enlarged_size(height, width, min_short_side) != (height, width)
        how = (f"enlarged to a short side of {min_short_side} (--min-short-side), then x{scale}" if enlarged
               else f"x{scale}")
        fix = "lower --min-short-side" if enlarged else "downscale the input first"
        raise ConfigError(f"{source.path}: {width}x{height} frames would be processed at {pw}x{ph} px ({how}); "
                          f"frames are limited to {MAX_FRAME_SIDE} px a side and {MAX_FRAME_PIXELS // 10**6} "
                          f"megapixels: {fix}")


class Terminated(SystemExit):
    """SIGTERM arrived under :func:`sigterm_raises`; the exit code is ``128 + SIGTERM``."""


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """While active, SIGTERM raises :class:`Terminated` in the main thread instead of killing the process.

    So the ``except``/``finally`` blocks that remove temporary outputs run on SIGTERM as on Ctrl-C. A
    second SIGTERM during that clean-up is ignored. Outside the main thread (where Python cannot set
    signal handlers) it does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum: int, _frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated(128 + signum)

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        # None = a handler installed outside Python; the default is the closest we can put back.
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


class Upscaler:
    """Runs a generator over frame sequences (with :class:`WindowRunner`).

    Args:
        model: A :class:`~dlightning.models.generator.DLoRALGenerator` or an exported one, already on
            its device and dtype.
        cfg: Inference settings.
        color_fix_default: Colour fix when ``cfg.color_fix`` is None.
        prompt_default: Prompt when ``cfg.prompt`` is None.
    """

    def __init__(self, model, cfg: UpscaleConfig, color_fix_default: str = "adain", prompt_default: str = "",
                 ) -> None:
        self.model = model
        self.cfg = cfg
        self.scale = int(model.cfg.scale)
        self.color_fix = cfg.color_fix if cfg.color_fix is not None else color_fix_default
        self.prompt = cfg.prompt if cfg.prompt is not None else prompt_default
        # The frozen VAE carries the compute dtype (a training generator keeps its trainables in fp32).
        param = next(model.vae.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.prompter = build_prompter(cfg.prompt_model, cfg.prompt_tagger, device=str(self.device))
        self.settings = WindowSettings(batch_windows=cfg.batch_windows, min_short_side=cfg.min_short_side,
                                       tile_size=cfg.tile_size, tile_overlap=cfg.tile_overlap,
                                       color_fix=self.color_fix, reuse_latents=cfg.reuse_latents)
        self._generator: torch.Generator | None = None
        if cfg.channels_last:
            model.unet.to(memory_format=torch.channels_last)
            model.vae.to(memory_format=torch.channels_last)
        if cfg.compile:
            model.unet = torch.compile(model.unet)

    def _vae_tiling(self):
        """The VAE tiling of frames above ``vae_tile_size``: shared GroupNorm statistics or diffusers' own."""
        if self.cfg.vae_tile_size == 0:
            return contextlib.nullcontext()
        if self.cfg.vae_tiling == "diffusers":
            return diffusers_vae_tiling(self.model.vae, self.cfg.vae_tile_size)
        return shared_norm_tiling(self.model.vae, self.cfg.vae_tile_size, self.cfg.vae_tile_padding)

    def runner(self) -> WindowRunner:
        """The window runner of this model and these settings (sampled latents from the source's seed)."""
        runner_cls = ReferenceWindowRunner if self.cfg.reference_io else WindowRunner
        return runner_cls(self.model, self.scale, self.settings, self.prompt, dtype=self.dtype, device=self.device,
                          vae_context=self._vae_tiling, generator=self._generator)

    def upscale_frames(self, frames: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """Upscale a frame sequence (RGB uint8 ``(h, w, 3)``), yielding every output frame in order.

        Sampled VAE latents (``vae_latent=sample`` models) come from a stream seeded with ``cfg.seed`` per
        sequence, as in the export's diffusers pipeline; torch's global RNG is left untouched.

        Raises:
            InputError: The frames do not share one size.
        """
        if self.cfg.seed is not None:
            self._generator = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
        try:
            if self.prompter is not None:  # the reference's per-video prompt, from the first frame
                first, frames = peek_first(frames)
                if first is not None:
                    self.prompt = video_prompt(self.prompter, first, self.scale, self.cfg.prompt or "")
                    log.info("prompt from %s: %r", self.cfg.prompt_tagger or self.cfg.prompt_model, self.prompt)
            yield from self.runner().upscale(frames)
        except FrameSizeError as err:
            raise InputError(str(err)) from err

    # ------------------------------------------------------------------ files
    def upscale_source(self, source: VideoSource, out: Path, *, overwrite: bool = False) -> Path:
        """Upscale one source into ``out`` (a video when ``out`` has a video suffix, else a frame folder).

        ``out`` is written as a temporary sibling and published at the end; on any error or interrupt the
        temporary sibling is removed. ``overwrite`` lets the end replace an existing video, or the frames
        of an existing frame folder (:class:`~dlightning.inference.video_io.FrameFolderWriter`).
        """
        as_video = is_video_path(out)
        if as_video and source.fps is None:
            raise InputError(f"{source.path} is a frame folder (no frame rate): give an output folder "
                             f"without a video suffix instead of {out}")
        total = source.num_frames
        if self.cfg.max_frames:
            total = min(total, self.cfg.max_frames) if total else self.cfg.max_frames
        start, count = time.perf_counter(), 0
        writer = None
        bar = tqdm(total=total, unit="frame", desc=source.path.name, dynamic_ncols=True)
        try:
            writer = (VideoWriter(out, source.fps, source.path if source.has_audio else None, crf=self.cfg.crf,
                                  replace=overwrite)
                      if as_video else FrameFolderWriter(out, overwrite=overwrite))
            for frame in self.upscale_frames(source.frames(self.cfg.max_frames)):
                writer.write(frame)
                count += 1
                bar.update(1)
            writer.close()
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        finally:
            bar.close()
        log.info("%s -> %s: %d frames, %.2f frames/s", source.path, out, count,
                 count / max(time.perf_counter() - start, 1e-9))
        return out


# ------------------------------------------------------------------------------------------ outputs
def _is_folder_of_videos(inp: Path, sources: list[VideoSource]) -> bool:
    return inp.is_dir() and sources[0].kind == "video"


def output_paths(inp: str | Path, sources: list[VideoSource], out: str | Path) -> list[Path]:
    """Where each source goes: ``out`` for a video or a frame folder, ``out/<stem>.mp4`` per video of a
    folder of videos (even one).

    Raises:
        ConfigError: A folder of videos with a video name as output, or two videos with one stem.
    """
    inp, out = Path(inp), Path(out)
    if not _is_folder_of_videos(inp, sources):
        return [out]
    if is_video_path(out):
        raise ConfigError(f"{inp} is a folder of videos: give an output folder (no video suffix), not {out}")
    targets: dict[Path, Path] = {}
    for source in sources:
        target = out / f"{source.path.stem}.mp4"
        if target in targets:
            raise ConfigError(f"{targets[target].name} and {source.path.name} would both be written to {target}; "
                              "rename one of them")
        targets[target] = source.path
    return list(targets)


def check_output_location(inp: str | Path, out: str | Path) -> None:
    """Refuse an output that is the input, contains it, or lies inside an input folder.

    Raises:
        ConfigError: The message names the clash and asks for another ``-o``.
    """
    src, dst = Path(inp).resolve(), Path(out).resolve()
    if dst == src:
        raise ConfigError(f"-o {out} is the input itself; upscale never writes over its input: choose another "
                          "output")
    if src.is_relative_to(dst):
        raise ConfigError(f"-o {out} contains the input {inp}; choose an output outside it")
    if Path(inp).is_dir() and dst.is_relative_to(src):
        raise ConfigError(f"-o {out} is inside the input folder {inp} (which upscale only reads); choose an "
                          "output outside it")


def _check_parent_writable(target: Path) -> None:
    """The nearest existing ancestor of ``target`` must be a folder we may write into."""
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"cannot create {target}: {parent} is a file, not a folder; choose another output")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write {target}: no write permission in {parent}; choose another output")


def check_target(target: Path, source: VideoSource, *, overwrite: bool = False) -> None:
    """Refuse a target that upscale may not (over)write: see :func:`plan_outputs`.

    Raises:
        InputError: A frame folder (no frame rate) would become a video.
        ConfigError: The message names the problem and the fix (often ``--overwrite``).
    """
    if is_video_path(target) and source.fps is None:
        raise InputError(f"{source.path} is a frame folder (no frame rate): give an output folder without a "
                         f"video suffix instead of {target}")
    _check_parent_writable(target)
    if not target.exists():
        return
    if source.kind == "video" and target.is_file() and os.path.samefile(target, source.path):
        raise ConfigError(f"-o {target} is the input itself (the same file); choose another output")
    if is_video_path(target):
        _check_existing_video(target, overwrite)
    else:
        _check_existing_frame_folder(target, overwrite)


def _check_existing_video(target: Path, overwrite: bool) -> None:
    if target.is_dir():
        raise ConfigError(f"{target} is a folder; name a video file, or drop the video suffix to write a frame "
                          "folder")
    if not overwrite:
        raise ConfigError(f"{target} exists; pass --overwrite to replace it, or choose another name")


def _check_existing_frame_folder(target: Path, overwrite: bool) -> None:
    if not target.is_dir():
        raise ConfigError(f"{target} is a file, not a frame folder; choose another name (a video needs a video "
                          "suffix such as .mp4)")
    if not any(target.iterdir()):
        return
    if not overwrite:
        raise ConfigError(f"{target} is a non-empty folder; pass --overwrite to replace the frames upscale writes "
                          f"there ({FRAME_NAME.format(0)}, ...; other files are kept), or choose a new folder")
    if not os.access(target, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot replace the frames in {target}: no write permission; choose another output")


def plan_outputs(inp: str | Path, sources: list[VideoSource], out: str | Path, *, overwrite: bool = False,
                 ) -> list[Path]:
    """The outputs of ``sources`` (from ``inp``) under ``out``, every one checked before any work starts.

    Rules: an output is never the input, never contains it and never lies inside an input folder; an
    existing video or non-empty frame folder is refused unless ``overwrite``; with ``overwrite`` a video
    is replaced, and a frame folder gets its ``frame_NNNNNN.png`` files replaced (those beyond the new
    frame count removed) while every other file in it stays.

    Raises:
        ConfigError: A target breaks a rule; the message names it and the fix.
    """
    check_output_location(inp, out)
    targets = output_paths(inp, sources, out)
    for source, target in zip(sources, targets, strict=True):
        check_target(target, source, overwrite=overwrite)
    return targets


def upscale_path(model, inp: str | Path, out: str | Path, cfg: UpscaleConfig, *, color_fix_default: str = "adain",
                 prompt_default: str = "", overwrite: bool = False) -> list[Path]:
    """Upscale a video, a frame folder or a folder of videos (inputs and outputs are checked first).

    Args:
        overwrite: Replace existing outputs, only what upscale writes (:func:`plan_outputs`).

    Returns:
        The written outputs.

    Raises:
        ConfigError: An input, an output or a frame size is refused, before any frame is processed.
    """
    sources = collect_inputs(inp)
    targets = plan_outputs(inp, sources, out, overwrite=overwrite)
    check_frame_sizes(sources, int(model.cfg.scale), cfg.min_short_side)
    upscaler = Upscaler(model, cfg, color_fix_default=color_fix_default, prompt_default=prompt_default)
    return [upscaler.upscale_source(s, t, overwrite=overwrite) for s, t in zip(sources, targets, strict=True)]


def export_upscaler(model, cfg: UpscaleConfig | None = None) -> Upscaler:
    """An :class:`Upscaler` of a loaded export (``load_exported``) whose defaults are the export's own.

    ``cfg.color_fix`` / ``cfg.prompt`` left at None take the colour fix and prompt stored in the export.
    """
    meta = model.meta
    return Upscaler(model, cfg or UpscaleConfig(), color_fix_default=meta.get("color_fix", "adain"),
                    prompt_default=meta.get("prompt", ""))


def upscale_exported(export_dir: str | Path, inp: str | Path, out: str | Path, cfg: UpscaleConfig, *,
                     overwrite: bool = False) -> list[Path]:
    """Load an export folder on the configured device/dtype and upscale ``inp`` into ``out``.

    Inputs, outputs (:func:`plan_outputs`, ``overwrite`` as there) and frame sizes are checked before the
    model loads.

    Raises:
        ConfigError: An input, an output or a frame size is refused.
        MissingWeightsError: ``export_dir`` is not a complete export.
    """
    from dlightning.contracts.export_format import read_metadata
    from dlightning.inference.exported import load_exported

    sources = collect_inputs(inp)
    plan_outputs(inp, sources, out, overwrite=overwrite)
    meta = read_metadata(export_dir)
    check_frame_sizes(sources, int(meta["scale"]), cfg.min_short_side)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    model = load_exported(export_dir, device=device, dtype=dtype)
    return upscale_path(model, inp, out, cfg, color_fix_default=meta.get("color_fix", "adain"),
                        prompt_default=meta.get("prompt", ""), overwrite=overwrite)
