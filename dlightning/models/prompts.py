"""Frozen CLIP text encoding of captions, cached per distinct prompt."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


class PromptEncoder(nn.Module):
    """Tokenize and encode prompts with a frozen CLIP text encoder (``last_hidden_state``, (B, 77, D)).

    Embeddings are cached per distinct prompt string (least recently used evicted beyond
    ``cache_size``); the cache is cleared when the encoder changes device or dtype.

    Args:
        tokenizer: A CLIP tokenizer (pads / truncates to its ``model_max_length``, 77 for SD).
        text_encoder: A ``CLIPTextModel``; frozen and kept in eval mode.
        cache_size: Maximum number of cached prompts (0 disables the cache).
    """

    def __init__(self, tokenizer, text_encoder: nn.Module, cache_size: int = 1024) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.cache_size = cache_size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cache_key: tuple | None = None
        self.cache_hits = 0
        self.cache_misses = 0

    def train(self, mode: bool = True) -> PromptEncoder:
        """Keep the frozen text encoder in eval mode whatever the parent's mode."""
        super().train(mode)
        self.text_encoder.eval()
        return self

    @property
    def max_length(self) -> int:
        """Token sequence length (77 for SD)."""
        return int(self.text_encoder.config.max_position_embeddings)

    def _device_dtype(self) -> tuple[torch.device, torch.dtype]:
        p = next(self.text_encoder.parameters())
        return p.device, p.dtype

    @torch.no_grad()
    def _encode_uncached(self, prompts: list[str]) -> torch.Tensor:
        device, _ = self._device_dtype()
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="pt").input_ids.to(device)
        return self.text_encoder(ids).last_hidden_state

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Encode prompts (the empty string is a valid prompt).

        Args:
            prompts: B strings.

        Returns:
            ``(B, 77, D)`` embeddings on the text encoder's device and dtype, without grad.
        """
        if isinstance(prompts, str):
            raise TypeError("encode expects a list of prompts, got a single string; wrap it in a list")
        key = self._device_dtype()
        if key != self._cache_key:
            self._cache.clear()
            self._cache_key = key
        todo = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        self.cache_misses += len(todo)
        self.cache_hits += sum(1 for p in prompts if p in self._cache)
        fresh = dict(zip(todo, self._encode_uncached(todo), strict=True)) if todo else {}
        out = torch.stack([self._cache[p] if p in self._cache else fresh[p] for p in prompts])
        if self.cache_size > 0:
            for p, emb in fresh.items():
                self._cache[p] = emb
            for p in prompts:
                if p in self._cache:
                    self._cache.move_to_end(p)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return out
