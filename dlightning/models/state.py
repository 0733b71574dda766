"""Checked copying of named tensors from a loaded file into a model."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from dlightning.errors import MissingWeightsError


def copy_tensors(own: Mapping[str, torch.Tensor], theirs: Mapping[str, torch.Tensor], keys: Iterable[str], *,
                 source: str) -> None:
    """Copy ``theirs[k]`` into ``own[k]`` (in place, cast to ``own``'s dtype) for every key.

    Every key is checked first, so a mismatching file changes nothing.

    Raises:
        MissingWeightsError: a key is absent from ``theirs`` or has another shape; the message names
            ``source`` and the first offending keys.
    """
    keys = list(keys)
    missing = sorted(k for k in keys if k not in theirs)
    wrong = [f"{k} {tuple(theirs[k].shape)} vs {tuple(own[k].shape)}" for k in keys
             if k in theirs and theirs[k].shape != own[k].shape]
    if missing or wrong:
        raise MissingWeightsError(f"{source} does not match the model: {len(missing)} missing keys {missing[:5]}, "
                                  f"{len(wrong)} mis-shaped {wrong[:5]}")
    with torch.no_grad():
        for k in keys:
            own[k].copy_(theirs[k].to(own[k].dtype))
