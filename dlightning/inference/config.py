"""Config sections of export, upscaling and validation (composed into RootConfig by the lead)."""

from __future__ import annotations

from dataclasses import dataclass, field

from dlightning.contracts.checkpoint_format import WEIGHT_KINDS
from dlightning.contracts.config_io import check_choice, check_range
from dlightning.errors import ConfigError
from dlightning.losses.config import LPIPSConfig
from dlightning.metrics.registry import metric_spec
from dlightning.metrics.weights import MetricWeights

DTYPES = ("auto", "fp32", "bf16", "fp16")
COLOR_FIXES = ("adain", "wavelet", "none")
VAE_TILINGS = ("shared_norm", "diffusers")


MAX_MIN_SHORT_SIDE = 4096
"""Largest ``upscale.min_short_side``: an LQ short side of 4096 is already a 16384-pixel output side."""


@dataclass
class ExportConfig:
    """How a training checkpoint becomes one merged single-step model folder."""

    scale_consistency: float = 1.0
    """Scale at which the C-LoRA family is fused into the UNet."""
    scale_detail: float = 1.0
    """Scale at which the D-LoRA family is fused (0 = consistency-only model)."""
    dtype: str = "fp32"
    """Dtype of the saved UNet, VAE and text encoder (fp32 | fp16 | bf16); merging is always fp32."""
    link_base: bool = False
    """sd21 only: store model.pretrained_path instead of copying VAE / text encoder / tokenizer."""
    overwrite: bool = False
    """Replace an existing export in the target folder."""
    color_fix: str = "adain"
    """Colour-fix default written into the export (adain | wavelet | none)."""
    prompt: str = ""
    """Default prompt written into the export."""
    weights: str = "raw"
    """raw: the trained tensors; ema: their moving average (checkpoints trained with optim.ema.enabled)."""
    adapters: bool = False
    """Write the LoRA-only adapter folder (C-LoRA, D-LoRA, conv_in, CFR) instead of the merged model."""

    def __post_init__(self) -> None:
        if self.adapters and self.link_base:
            raise ConfigError("export: --link-base is for merged exports; an adapter export never holds the base "
                              "model (drop --link-base)")
        check_choice("export", "dtype", self.dtype, ("fp32", "fp16", "bf16"))
        check_choice("export", "weights", self.weights, WEIGHT_KINDS)
        check_choice("export", "color_fix", self.color_fix, COLOR_FIXES)
        check_range("export", "scale_consistency", self.scale_consistency, low=0)
        check_range("export", "scale_detail", self.scale_detail, low=0)


@dataclass
class UpscaleConfig:
    """Video upscaling with an exported (or in-memory) model."""

    batch_windows: int = 4
    """(previous, current) windows per UNet call."""
    reuse_latents: bool = True
    """Encode each frame once: the next batch of windows reuses the last frame's latent (``mode`` latents
    only, whose values this does not change; false re-encodes it, the path before this option)."""
    tile_size: int = 96
    """Latent tile side; the latent is tiled when its area exceeds tile_size^2 (docs/METHOD.md 7.4)."""
    tile_overlap: int = 32
    """Latent overlap between neighbouring tiles (blended with Gaussian weights)."""
    vae_tile_size: int = 1536
    """Pixel tile side of the tiled VAE, used only for frames larger than it (0 = never tile). Frames
    that fit stay whole; the reference decodes untiled up to about 1968 px."""
    vae_tiling: str = "shared_norm"
    """shared_norm = tiles share whole-frame GroupNorm statistics and the mid-block attention runs on the
    whole latent-size map (dlightning/inference/tiled_vae.py; ~exact given the padding); diffusers =
    diffusers' enable_tiling() (per-tile statistics, blended overlaps; docs/INFERENCE.md)."""
    vae_tile_padding: int = 11
    """shared_norm only: margin in latents around every VAE tile (the reference decoder uses 11)."""
    color_fix: str | None = None
    """adain | wavelet | none; None = the export's default."""
    prompt: str | None = None
    """Prompt for every frame; None = the export's default."""
    seed: int = 42
    """Seeds the VAE latent sampling (vae_latent=sample) per video: same seed, same output."""
    dtype: str = "auto"
    """auto = bf16 on CUDA (fp16 without bf16 support), fp32 on CPU."""
    device: str = "auto"
    """auto = cuda when available, else cpu; or any torch device string."""
    max_frames: int = 0
    """Process at most this many frames per video (0 = all)."""
    min_short_side: int = 128
    """LQ frames with a shorter side below this are bicubic-enlarged first (docs/METHOD.md 1.5)."""
    crf: int = 18
    """H.264 constant rate factor of written videos."""
    channels_last: bool = False
    """Run the UNet and VAE in channels-last memory format (often faster on GPUs with tensor cores)."""
    compile: bool = False
    """torch.compile the UNet (first windows are slow while it compiles; pays off on long videos)."""
    reference_io: bool = False
    """The reference's PIL / uint8 pre- and post-processing instead of dlightning's float path
    (dlightning/inference/reference_io.py; output sides rounded down to a multiple of 8 as there)."""
    prompt_model: str | None = None
    """Local captioner folder (transformers), or the file a prompt_tagger loads: each video is prompted
    from its first frame, the reference's way (dlightning/inference/prompting.py); None = one fixed prompt."""
    prompt_tagger: str | None = None
    """module:factory of a RAM / DAPE-compatible tagger plug-in (called with prompt_model)."""

    def __post_init__(self) -> None:
        check_choice("upscale", "dtype", self.dtype, DTYPES)
        check_choice("upscale", "vae_tiling", self.vae_tiling, VAE_TILINGS)
        if self.color_fix is not None:
            check_choice("upscale", "color_fix", self.color_fix, COLOR_FIXES)
        if self.batch_windows < 1:
            raise ConfigError("upscale.batch_windows must be >= 1")
        if self.tile_size < 8 or not 0 <= self.tile_overlap < self.tile_size:
            raise ConfigError("upscale.tile_size must be >= 8 and 0 <= upscale.tile_overlap < tile_size")
        if min(self.max_frames, self.min_short_side, self.vae_tile_size, self.vae_tile_padding) < 0:
            raise ConfigError("upscale.max_frames, min_short_side, vae_tile_size and vae_tile_padding "
                              "must be >= 0")
        # The short side is enlarged to this before the x4 model: beyond 4096 no frame fits in memory.
        check_range("upscale", "min_short_side", self.min_short_side, low=0, high=MAX_MIN_SHORT_SIDE)
        check_range("upscale", "crf", self.crf, low=0, high=51)
        check_range("upscale", "seed", self.seed, low=0)


@dataclass
class ValidationConfig:
    """Periodic validation on held-out clips during training (rank 0) and `dlightning validate`."""

    every_n_steps: int = 0
    """Run every this many optimizer steps (0 = never during training)."""
    lq_dir: str | None = None
    """Folder of LQ videos (or frame folders); paired with gt_dir by file stem."""
    gt_dir: str | None = None
    """Folder of GT videos (or frame folders), scale x the LQ size."""
    shards: str | None = None
    """Alternatively a shard-set folder (manifest.json + tars) written by data_prep."""
    max_clips: int = 4
    max_frames: int = 8
    """Frames per clip (from the start)."""
    write_videos: bool = True
    """Write side-by-side videos (LQ bicubic | output | GT) and temporal-profile PNGs."""
    fps: float = 10.0
    """Frame rate of the side-by-side videos when the source has none (shards)."""
    flow_net: str = "spynet"
    """Flow of E*warp: spynet (weights from flow_path) or farneback (OpenCV, no weights)."""
    flow_path: str | None = None
    """Local SPyNet weights for E*warp; None = random flow net (tests only; values meaningless)."""
    compute_lpips: bool = True
    lpips: LPIPSConfig = field(default_factory=LPIPSConfig)
    y_channel: bool = False
    """PSNR / SSIM on the BT.601 Y channel instead of RGB."""
    crop_border: int = 0
    """Pixels removed from each border before PSNR / SSIM."""
    upscale: UpscaleConfig = field(default_factory=lambda: UpscaleConfig(color_fix="none"))
    """Inference settings of the validation forward (colour fix off by default)."""
    weights: str = "raw"
    """raw: validate the trained tensors; ema: their moving average (needs optim.ema.enabled)."""
    metrics: list[str] = field(default_factory=list)
    """More metrics of dlightning evaluate (docs/EVALUATION.md), e.g. [psnr_y, dists, musiq, ewarp_raft],
    logged as val/<name>; their files come from metric_weights."""
    metric_weights: MetricWeights = field(default_factory=MetricWeights)
    """Local weight files of those metrics (validation.metric_weights.<name>)."""

    def __post_init__(self) -> None:
        check_choice("validation", "flow_net", self.flow_net, ("spynet", "farneback"))
        check_choice("validation", "weights", self.weights, WEIGHT_KINDS)
        for name in self.metrics:
            metric_spec(name)  # an unknown metric fails when the config loads
        if self.every_n_steps < 0 or self.max_clips < 1 or self.max_frames < 2:
            raise ConfigError("validation.every_n_steps >= 0, max_clips >= 1 and max_frames >= 2 required")
        if (self.lq_dir is None) != (self.gt_dir is None):
            raise ConfigError("validation.lq_dir and validation.gt_dir must be set together")
        if self.lq_dir is not None and self.shards is not None:
            raise ConfigError("set either validation.lq_dir/gt_dir or validation.shards, not both")
        check_range("validation", "fps", self.fps, low=0, low_open=True)
        check_range("validation", "crop_border", self.crop_border, low=0)
