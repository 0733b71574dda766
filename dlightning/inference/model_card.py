"""The model card (``README.md``) of an export: what it is, how it was made, how to run it.

Rendered from plain data only: the export metadata, the :class:`Provenance` of the weights (the checkpoint's
stored training config, its optimizer step, the exact command) and the validation metrics of that step when
the run folder has them (``<run_dir>/validation/step-XXXXXXXX/metrics.json``, written by
:mod:`dlightning.training.validation`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dlightning.utils.logging import get_logger

log = get_logger(__name__)

METRICS_FILE = "metrics.json"
_METRIC_ORDER = ("val/psnr", "val/ssim", "val/lpips", "val/ewarp", "val/ewarp_gt")


@dataclass(frozen=True)
class Provenance:
    """Where an export's weights came from."""

    source: str = ""
    """The checkpoint or ``model.pkl`` (empty for a generator exported from Python)."""
    command: str | None = None
    """The command line that made the export (None: the Python API)."""
    workdir: str | None = None
    """The working directory the command ran in (its relative paths start there)."""
    training_config: dict[str, Any] | None = None
    """The checkpoint's stored RootConfig (plain types); None for the authors' ``model.pkl``."""
    optimizer_step: int | None = None
    """Optimizer steps of the checkpoint."""
    checkpoint_path: Path | None = None
    """The resolved checkpoint file or folder (to find its run folder)."""


# ------------------------------------------------------------------------------------------ validation
def _run_folders(prov: Provenance) -> list[Path]:
    """Candidate run folders: the one holding the checkpoint's ``checkpoints/`` folder, then ``trainer.run_dir``."""
    found: list[Path] = []
    path = prov.checkpoint_path
    if path is not None and path.parent.name == "checkpoints":
        found.append(path.parent.parent)
    run_dir = ((prov.training_config or {}).get("trainer") or {}).get("run_dir")
    if run_dir:
        found.append(Path(run_dir))
    return list(dict.fromkeys(found))


def find_validation_metrics(prov: Provenance) -> tuple[Path, dict[str, Any]] | None:
    """The ``metrics.json`` of the checkpoint's step in its run folder, with its contents; None when absent."""
    if prov.optimizer_step is None:
        return None
    for run_dir in _run_folders(prov):
        path = run_dir / "validation" / f"step-{prov.optimizer_step:08d}" / METRICS_FILE
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
            log.warning("model card: ignoring unreadable %s (%s)", path, err)
            continue
        if isinstance(data, dict):
            return path, data
    return None


def _metrics_section(prov: Provenance) -> list[str]:
    found = find_validation_metrics(prov)
    if found is None:
        where = ", ".join(str(p / "validation") for p in _run_folders(prov)) or "no run folder known"
        step = "" if prov.optimizer_step is None else f" for step {prov.optimizer_step}"
        return [f"No validation metrics{step} were found ({where}).", ""]
    path, data = found
    keys = [k for k in _METRIC_ORDER if k in data] + sorted(k for k in data if k.startswith("val/")
                                                             and k not in _METRIC_ORDER)
    lines = [f"From `{path}` (step {data.get('step', prov.optimizer_step)}, "
             f"{len(data.get('per_clip') or [])} clips):", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k.removeprefix('val/')} | {_number(data[k])} |" for k in keys]
    return [*lines, ""]


def _number(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "undefined (NaN)" if math.isnan(value) else f"{value:.6g}"
    return str(value)


# ------------------------------------------------------------------------------------------ sections
def _base_model(model: dict[str, Any]) -> str:
    if model.get("preset") == "tiny":
        return f"the tiny preset (toy-size SD 2.1 architecture, random weights, seed {model.get('seed')})"
    return f"Stable Diffusion 2.1 base, read from `{model.get('pretrained_path')}`"


def _schedule_summary(schedule: dict[str, Any]) -> list[str]:
    if schedule.get("preset") == "reference":
        return ["- schedule: `reference` (the reference training script's phases, dlightning's docs/METHOD.md 4.3)"]
    lines = ["- schedule: `custom`, segments:"]
    start = 0
    for seg in schedule.get("segments", []):
        end = seg.get("end")
        span = f"[{start}, {end}]" if end is not None else f"[{start}, ...)"
        weights = ", ".join(f"{k} {v:g}" for k, v in sorted((seg.get("weights") or {}).items()))
        lines.append(f"  - {seg.get('phase')} {span}, ramp {seg.get('ramp', 0)}: {weights}")
        start = (end or 0) + 1
    return lines


def _training_section(prov: Provenance) -> list[str]:
    cfg = prov.training_config
    if cfg is None:
        return ["The training configuration is not known (the weights did not come from a dlightning "
                "checkpoint).", ""]
    optim, trainer = cfg.get("optim") or {}, cfg.get("trainer") or {}
    lora = (cfg.get("model") or {}).get("lora") or {}
    group_lr = optim.get("group_lr") or {}
    lines = [f"- optimizer steps of this checkpoint: {prov.optimizer_step} (of trainer.max_steps "
             f"{trainer.get('max_steps')})",
             *_schedule_summary(cfg.get("schedule") or {}),
             f"- learning rate: {optim.get('lr')} ({optim.get('lr_schedule', 'constant')}, warm-up "
             f"{optim.get('warmup_steps', 0)} steps)" + (f", per group {group_lr}" if group_lr else ""),
             f"- LoRA ranks: consistency {lora.get('rank_consistency')}, detail {lora.get('rank_detail')}; "
             f"alpha {lora.get('alpha')}; groups {lora.get('groups')}",
             f"- clips per step: {(cfg.get('data') or {}).get('batch_size')} x {trainer.get('devices')} devices x "
             f"{trainer.get('num_nodes')} nodes x accumulation {optim.get('accumulate')}; precision "
             f"{trainer.get('precision')}",
             f"- EMA: {'on' if (optim.get('ema') or {}).get('enabled') else 'off'}"]
    return [*lines, ""]


def _provenance_section(prov: Provenance) -> list[str]:
    lines = [f"Weights: `{prov.source}`." if prov.source else "Weights: a generator exported from Python."]
    if prov.command:
        where = f" (run in `{prov.workdir}`)" if prov.workdir else ""
        lines += ["", f"Made with{where}:", "", "```bash", prov.command, "```"]
    else:
        lines += ["", "Made with the Python API (`dlightning.export.export_generator`)."]
    return [*lines, ""]


def _merged_usage(folder_hint: str, linked: bool) -> list[str]:
    lines = ["With dlightning:", "", "```bash", f"dlightning upscale input.mp4 -o output.mp4 --model {folder_hint}",
             "```", "",
             "With diffusers alone (torch, diffusers, transformers and safetensors; dlightning not needed). The "
             "export carries its pipeline code (`pipeline.py`, `dloral_onestep.py`, `dloral_frames.py`, "
             "`cfr/dloral_cfr.py`), so diffusers needs `trust_remote_code=True` to run it:", "",
             "```python", "import torch", "from diffusers import DiffusionPipeline", "from PIL import Image", "",
             f'pipe = DiffusionPipeline.from_pretrained("{folder_hint}", custom_pipeline="{folder_hint}",',
             "                                         trust_remote_code=True)",
             'frames = [Image.open(f"lq/{i:04d}.png") for i in range(10)]   # one video, in order',
             "out = pipe(frames).frames            # PIL images, scale x the input size",
             "```", "",
             "`pipe(frames, prompt=None, color_fix=None, batch_windows=4, min_short_side=128, tile_size=96, "
             "tile_overlap=32, vae_tile_size=0, seed=42, generator=None, output_type=\"pil\")`: frames are PIL "
             "images, uint8 arrays (h, w, 3), a uint8 array/tensor (T, h, w, 3) or a float tensor (T, 3, h, w) in "
             "[0, 1]; `output_type` `pil`, `np` (uint8 arrays) or `pt` (float (T, 3, H, W) in [0, 1]). On a GPU: "
             "`pipe.to(\"cuda\")`, and `torch_dtype={\"default\": torch.bfloat16, \"text_encoder\": torch.float32}` "
             "in `from_pretrained` for dlightning's precision. The VAE runs on whole frames (`vae_tile_size > 0`: "
             "diffusers' VAE tiling); `dlightning upscale` also offers whole-frame-statistics VAE tiling for large "
             "frames (docs/INFERENCE.md).", ""]
    if linked:
        lines += ["This export links its base model (`base_path` in `dlightning_export.json`): pass "
                  "`vae=`, `text_encoder=`, `tokenizer=` and `scheduler=` loaded from that folder to "
                  "`from_pretrained`.", ""]
    return lines


def _adapter_usage(meta: dict[str, Any], folder: str) -> list[str]:
    scales = meta.get("scales", {})
    return [f"`ADAPTERS` below is `{folder}`, `BASE` the base model folder.", "",
            "Apply to the base UNet with diffusers (peft installed). `conv_in.safetensors` is the trained "
            "8-channel `conv_in` (`weight` (320, 8, 3, 3), `bias`): a full layer, not a LoRA, so it replaces "
            "the base UNet's 4-channel `conv_in` first (the encoder LoRAs also adapt it):", "",
            "```python", "import torch", "from diffusers import UNet2DConditionModel",
            "from safetensors.torch import load_file", "",
            'unet = UNet2DConditionModel.from_pretrained(BASE, subfolder="unet")   # SD 2.1 base',
            'conv = load_file(f"{ADAPTERS}/conv_in.safetensors")',
            "old = unet.conv_in",
            "unet.conv_in = torch.nn.Conv2d(conv[\"weight\"].shape[1], old.out_channels, old.kernel_size, "
            "old.stride, old.padding)",
            "unet.conv_in.load_state_dict(conv)",
            "unet.register_to_config(in_channels=unet.conv_in.in_channels)",
            'unet.load_lora_adapter(ADAPTERS, weight_name="lora_consistency.safetensors", prefix="unet", '
            'adapter_name="consistency")',
            'unet.load_lora_adapter(ADAPTERS, weight_name="lora_detail.safetensors", prefix="unet", '
            'adapter_name="detail")',
            f'unet.set_adapters(["consistency", "detail"], weights=[{scales.get("consistency", 1.0)}, '
            f'{scales.get("detail", 1.0)}])',
            "unet.fuse_lora()   # optional: the merged UNet of `dlightning export` without --adapters", "```", "",
            "CFR (`cfr/`) loads with diffusers' custom-component code: "
            "`get_class_from_dynamic_module(f\"{ADAPTERS}/cfr\", \"dloral_cfr.py\", "
            "class_name=\"CrossFrameRetrievalModel\", trust_remote_code=True).from_pretrained(f\"{ADAPTERS}/cfr\")` "
            "(from `diffusers.utils.dynamic_modules_utils`). For upscaling, a merged export "
            "(`dlightning export` without `--adapters`) is simpler.", ""]


def render_model_card(meta: dict[str, Any], prov: Provenance, kind: str = "merged", folder: str = "EXPORT") -> str:
    """The export's ``README.md``.

    Args:
        meta: The export metadata (``dlightning_export.json`` or ``dlightning_adapters.json`` contents).
        prov: Where the weights came from.
        kind: ``merged`` or ``adapters``.
        folder: The export's path as the user named it (used in the examples).
    """
    model = meta.get("model_config") or {}
    scales = meta.get("fused_families") or meta.get("scales") or {}
    what = ("merged single-step model (both LoRA families fused into the UNet)" if kind == "merged"
            else "LoRA-only adapters (C-LoRA, D-LoRA, the 8-channel conv_in and CFR)")
    lines = ["---", "library_name: diffusers", "tags: [video-super-resolution, one-step-diffusion, dloral]", "---",
             "", f"# DLoRAL video super-resolution x{meta.get('scale')}: {what}", "",
             f"Written by dlightning {meta.get('dlightning_version', 'unknown')} (export format "
             f"{meta.get('format', '?')}).", "",
             "## Model", "",
             f"- base model: {_base_model(model)}",
             f"- one step at timestep {meta.get('timestep')}, x0 rule `{meta.get('x0_rule')}`, VAE latent "
             f"`{meta.get('vae_latent')}`, scale x{meta.get('scale')}",
             f"- LoRA family scales: consistency (C) {scales.get('consistency')}, detail (D) {scales.get('detail')}",
             f"- CFR: {meta.get('cfr')}",
             f"- defaults: colour fix `{meta.get('color_fix')}`, prompt {meta.get('prompt')!r}; weights "
             f"{meta.get('dtype')}", "",
             "## Provenance", "", *_provenance_section(prov),
             "## Training configuration", "", *_training_section(prov),
             "## Validation", "", *_metrics_section(prov),
             "## How to run it", ""]
    lines += (_merged_usage(folder, bool(meta.get("base_path"))) if kind == "merged"
              else _adapter_usage(meta, folder))
    return "\n".join(lines).rstrip() + "\n"
