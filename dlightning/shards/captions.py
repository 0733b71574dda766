"""Per-clip captions: from a captions file, from a local image-captioning model, or empty."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dlightning.errors import ConfigError, MissingWeightsError
from dlightning.utils.logging import get_logger

log = get_logger(__name__)

CAPTION_MODES = ("none", "file", "model")

Captioner = Callable[[str, str, np.ndarray], str]
"""``captioner(key, clip_id, hr_frames) -> caption``."""


@dataclass
class CaptionConfig:
    """Where captions come from."""

    mode: str = "none"
    """none: empty captions; file: ``path`` maps clip ids (or sample keys) to text; model: ``model_path``."""
    path: str = ""
    """JSON object ``{id: text}`` or TSV lines ``id<TAB>text``."""
    model_path: str = ""
    """Local ``save_pretrained`` folder of a transformers image-captioning model (VisionEncoderDecoder such
    as ViT-GPT2, or BLIP) with its tokenizer and image processor; nothing is downloaded. The middle HR
    frame of each clip is captioned with greedy decoding."""
    max_new_tokens: int = 40
    """Longest caption, in tokens."""

    def __post_init__(self) -> None:
        if self.mode not in CAPTION_MODES:
            raise ConfigError(
                f"captions.mode={self.mode!r} is not valid; choose one of {list(CAPTION_MODES)}"
            )
        if self.max_new_tokens < 1:
            raise ConfigError(f"captions.max_new_tokens={self.max_new_tokens} must be >= 1")


def load_caption_file(path: str) -> dict[str, str]:
    """Read a JSON (``{id: text}``) or TSV (``id<TAB>text`` per line) captions file."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"captions.path={path!r} does not exist; point it at a JSON or TSV captions file")
    text = file.read_text(encoding="utf-8")
    if file.suffix.lower() == ".json":
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a JSON captions file must hold one object {{clip_id: caption}}")
        return {str(k): str(v) for k, v in data.items()}
    rows = csv.reader(text.splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE)
    out: dict[str, str] = {}
    for n, row in enumerate(rows, start=1):
        if not row:
            continue
        if len(row) < 2:
            raise ConfigError(f"{path}:{n}: expected 'clip_id<TAB>caption'")
        out[row[0]] = "\t".join(row[1:])
    return out


def _file_captioner(mapping: dict[str, str]) -> Captioner:
    def caption(key: str, clip_id: str, frames: np.ndarray) -> str:
        return mapping.get(key, mapping.get(clip_id, ""))

    return caption


def _load_caption_model(path: str) -> tuple[Any, Any, Any]:
    """Image processor, tokenizer and captioning model of a local ``save_pretrained`` folder.

    transformers 5 dropped the ``image-to-text`` pipeline, and its ``image-text-to-text`` pipeline needs a
    multimodal processor and a text prompt that encoder-decoder captioners (ViT-GPT2 and the like) do not
    have, so the Auto classes are used directly: ``AutoModelForImageTextToText`` covers both
    VisionEncoderDecoder and BLIP-style models.
    """
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    try:
        processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise MissingWeightsError(
            f"captions.model_path={path!r} is not a loadable image-captioning model ({err}); it needs the "
            "model, tokenizer and image-processor files written by save_pretrained"
        ) from err
    model.eval()
    log.info("captions: loaded %s from %s", type(model).__name__, path)
    return processor, tokenizer, model


def _model_captioner(cfg: CaptionConfig) -> Captioner:
    if not cfg.model_path or not Path(cfg.model_path).exists():
        raise MissingWeightsError(
            f"captions.model_path={cfg.model_path!r} does not exist; put a local image-to-text model folder "
            "there (saved with save_pretrained) or set captions.mode=none"
        )
    state: dict[str, Any] = {}

    def caption(key: str, clip_id: str, frames: np.ndarray) -> str:
        import torch
        from PIL import Image  # unambiguous channel order for the image processor

        if "model" not in state:  # lazy: loaded once per worker process, only when used
            state["processor"], state["tokenizer"], state["model"] = _load_caption_model(cfg.model_path)
        model = state["model"]
        middle = Image.fromarray(np.ascontiguousarray(frames[len(frames) // 2]))
        pixels = state["processor"](images=middle, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            # Greedy decoding: the caption of a clip must not change between (resumed) builds.
            ids = model.generate(pixel_values=pixels.to(model.device, model.dtype),
                                 max_new_tokens=cfg.max_new_tokens, do_sample=False, num_beams=1)
        return str(state["tokenizer"].batch_decode(ids, skip_special_tokens=True)[0]).strip()

    return caption


def build_captioner(cfg: CaptionConfig) -> Captioner:
    """Return the captioning function the config asks for (the model itself is loaded lazily).

    Raises:
        ConfigError: The captions file is missing or malformed.
        MissingWeightsError: ``mode=model`` and ``model_path`` does not exist.
    """
    if cfg.mode == "file":
        mapping = load_caption_file(cfg.path)
        log.info("captions: %d entries from %s", len(mapping), cfg.path)
        return _file_captioner(mapping)
    if cfg.mode == "model":
        return _model_captioner(cfg)
    return lambda key, clip_id, frames: ""
