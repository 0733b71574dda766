"""Config sections of the model: base components, LoRA families and CFR."""

from __future__ import annotations

from dataclasses import dataclass, field

from dlightning.contracts.config_io import check_choice, check_range
from dlightning.errors import ConfigError


@dataclass
class LoraConfig:
    """The two LoRA families (C = consistency, D = detail) injected into the UNet."""

    rank_consistency: int = 4
    """Rank of every C-LoRA adapter (parity: 4)."""
    rank_detail: int = 4
    """Rank of every D-LoRA adapter (parity: 4)."""
    alpha: float = 8.0
    """LoRA alpha; scaling = alpha / rank (parity: 8 -> 2.0)."""
    init: str = "gaussian"
    """peft init_lora_weights: gaussian (parity: A ~ N(0, 1/r^2), B = 0) or default (kaiming A)."""
    groups: list[str] = field(default_factory=lambda: ["encoder", "decoder", "mid"])
    """UNet groups that get adapters (parity: all three)."""
    scale_consistency: float = 1.0
    """Inference scale of the C family."""
    scale_detail: float = 1.0
    """Inference scale of the D family (0 gives the consistency-only model)."""

    def __post_init__(self) -> None:
        check_choice("model.lora", "init", self.init, ("gaussian", "default"))
        for g in self.groups:
            check_choice("model.lora", "groups[]", g, ("encoder", "decoder", "mid"))
        if self.rank_consistency < 1 or self.rank_detail < 1:
            raise ConfigError("model.lora.rank_* must be >= 1")
        check_range("model.lora", "alpha", self.alpha, low=0, low_open=True)
        check_range("model.lora", "scale_consistency", self.scale_consistency, low=0)
        check_range("model.lora", "scale_detail", self.scale_detail, low=0)


@dataclass
class CFRConfig:
    """Cross-frame retrieval: SPyNet flow, warping and thresholded cross-frame attention."""

    heads: int = 9
    embed_dim: int = 64
    temperature: float = 3000.0
    """Divisor inside ReLU((S - tau) / temperature) (parity: 3000)."""
    block_size: int = 1024
    """Query rows per block of the attention; memory grows linearly with frame area. 0 = dense."""
    topk: int = 0
    """Keep only the top-k keys per query before thresholding (0 = off, parity)."""
    spynet_path: str | None = None
    """Local SPyNet weights in the BasicVSR key layout; None = random init (tests / demo only)."""
    spynet_input_range: str = "minus_one_one"
    """What SPyNet is fed: minus_one_one (parity quirk of the reference) or zero_one (correct)."""
    in_channels: int = 4
    """Latent channels the attention reads and writes (SD VAE latents: 4)."""
    checkpoint_blocks: bool = True
    """Recompute each attention block in backward so training memory is also linear in frame area."""

    def __post_init__(self) -> None:
        check_choice("model.cfr", "spynet_input_range", self.spynet_input_range,
                     ("minus_one_one", "zero_one"))
        if self.block_size < 0 or self.topk < 0:
            raise ConfigError("model.cfr.block_size and model.cfr.topk must be >= 0")
        for key in ("heads", "embed_dim", "in_channels"):
            check_range("model.cfr", key, getattr(self, key), low=1)
        check_range("model.cfr", "temperature", self.temperature, low=0, low_open=True)


@dataclass
class ModelConfig:
    """The one-step generator: SD 2.1 components, 8-channel conv_in, LoRA families, CFR."""

    preset: str = "sd21"
    """sd21: read pretrained_path (diffusers layout); sd21_meta: full architecture, no weights
    (inspection only); tiny: same architecture at toy size with random weights (tests, demo)."""
    pretrained_path: str | None = None
    """Local Stable Diffusion 2.1 base folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/)."""
    scale: int = 4
    """Super-resolution factor: LQ frames are bicubic-upsampled by this before the VAE."""
    timestep: int = 1
    """UNet timestep of the one-step forward (parity: 1)."""
    x0_rule: str = "residual"
    """residual: z = z_fused - unet_out (parity); epsilon: proper DDPM eps->x0 at `timestep`."""
    vae_latent: str = "mode"
    """mode: deterministic latent (default); sample: latent_dist.sample() as the reference."""
    conv_in_bias: str = "pretrained"
    """pretrained: copy the 4-channel bias; random: PyTorch default init (reference quirk)."""
    gradient_checkpointing: bool = False
    seed: int = 0
    """Seed of the random weights of the tiny preset and of the LoRA init."""
    prompt_cache_size: int = 1024
    """Text embeddings kept per distinct prompt (least recently used evicted; 0 = no cache)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    cfr: CFRConfig = field(default_factory=CFRConfig)

    def __post_init__(self) -> None:
        check_choice("model", "preset", self.preset, ("sd21", "sd21_meta", "tiny"))
        check_choice("model", "x0_rule", self.x0_rule, ("residual", "epsilon"))
        check_choice("model", "vae_latent", self.vae_latent, ("mode", "sample"))
        check_choice("model", "conv_in_bias", self.conv_in_bias, ("pretrained", "random"))
        if self.scale < 1:
            raise ConfigError("model.scale must be >= 1")
        if self.prompt_cache_size < 0:
            raise ConfigError("model.prompt_cache_size must be >= 0")
        check_range("model", "timestep", self.timestep, low=0, high=999)
