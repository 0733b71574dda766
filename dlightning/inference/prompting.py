"""Per-video prompts from a tagger or a captioner read from local files (``upscale.prompt_model``).

The reference prompts each video with tags of its first frame after the x4 bicubic enlargement (a
RAM tagger with DAPE's degradation-aware weights), formatted as ``"<tag1>, <tag2>, ..., <prompt>,"``
(``"tag1, tag2, ,"`` with the default empty ``--prompt``). dlightning does the same with either

- a **captioner** (the supported way): ``upscale.prompt_model`` names a local transformers folder of an
  image-to-text model (e.g. BLIP ``BlipForConditionalGeneration``), loaded with ``local_files_only``;
  its caption takes the place of the tag list;
- a **tagger plug-in** (RAM / DAPE or anything compatible): ``upscale.prompt_tagger=module:factory``,
  where ``factory(prompt_model)`` returns a callable mapping a PIL RGB image to a list of tag strings.
  RAM and DAPE are not on PyPI, so dlightning ships no tagger; a few lines around the RAM package's
  ``ram(...)`` / ``inference_ram`` make one (docs/EVALUATION.md shows them).

``upscale.prompt`` is appended as the reference appends ``--prompt``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from dlightning.errors import ConfigError, MissingWeightsError

Prompter = Callable[[Image.Image], "Sequence[str] | str"]


def format_prompt(tags: Sequence[str] | str, extra: str = "") -> str:
    """The reference's prompt ``f"{tags}, {extra},"`` with the tags joined by ``", "``."""
    text = tags if isinstance(tags, str) else ", ".join(t.strip() for t in tags if t.strip())
    return f"{text}, {extra},"


class Captioner:
    """A local transformers image-to-text model as a prompter (greedy decoding, no prompt text).

    Args:
        path: The model folder (``config.json``, weights, processor files).
        max_new_tokens: Caption length limit.
        device: Where the captioner runs.
    """

    def __init__(self, path: str | Path, max_new_tokens: int = 30, device: str = "cpu") -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor, BlipForConditionalGeneration

        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise MissingWeightsError(f"upscale.prompt_model={path} is not a transformers model folder (no "
                                      "config.json): save a captioning model there with save_pretrained")
        self.processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
        try:
            model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True)
        except ValueError:
            # BLIP captioning is registered under its own class rather than the image-text-to-text auto class.
            model = BlipForConditionalGeneration.from_pretrained(folder, local_files_only=True)
        self.model = model.eval().to(device)
        self.device, self.max_new_tokens = device, max_new_tokens

    def __call__(self, image: Image.Image) -> str:
        import torch

        inputs = self.processor(images=image, return_tensors="pt").to(self.device)
        with torch.no_grad():
            ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        return self.processor.batch_decode(ids, skip_special_tokens=True)[0].strip()


def load_tagger(spec: str, model_path: str | None) -> Prompter:
    """The plug-in tagger ``module:factory`` called with ``model_path``.

    Raises:
        ConfigError: ``spec`` is not ``module:factory`` or does not import.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"upscale.prompt_tagger={spec!r} must be module:factory, e.g. my_tags.dape:build")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"upscale.prompt_tagger={spec!r} does not import ({err})") from err
    return factory(model_path)


def build_prompter(model_path: str | None, tagger: str | None, device: str = "cpu") -> Prompter | None:
    """The prompter of ``upscale.prompt_model`` / ``upscale.prompt_tagger`` (None when both are unset)."""
    if tagger:
        return load_tagger(tagger, model_path)
    if model_path:
        return Captioner(model_path, device=device)
    return None


def video_prompt(prompter: Prompter, first: np.ndarray, scale: int, extra: str = "") -> str:
    """The prompt of a video from its first LR frame (PIL bicubic x ``scale`` first, as the reference)."""
    img = Image.fromarray(first)
    img = img.resize((img.width * scale, img.height * scale), Image.BICUBIC)
    return format_prompt(prompter(img), extra)


def peek_first(frames: Iterable[np.ndarray]) -> tuple[np.ndarray | None, Iterator[np.ndarray]]:
    """The first frame of ``frames`` and an iterator that still yields it."""
    it = iter(frames)
    first = next(it, None)
    if first is None:
        return None, iter(())

    def chained() -> Iterator[np.ndarray]:
        yield first
        yield from it

    return first, chained()
