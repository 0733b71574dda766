"""Rebuild the generator of a training checkpoint: one restore used by export and validate."""

from __future__ import annotations

from typing import Any

from dlightning.contracts.checkpoint_format import TrainingCheckpoint
from dlightning.contracts.config_io import from_container
from dlightning.errors import ConfigError
from dlightning.models.config import ModelConfig
from dlightning.models.generator import DLoRALGenerator
from dlightning.models.state import copy_tensors


def stored_model_config(config: dict[str, Any]) -> ModelConfig:
    """The ``model`` section of a stored RootConfig dict as a ModelConfig."""
    if "model" not in config:
        raise ConfigError("the checkpoint's stored config has no 'model' section")
    return from_container(config["model"], ModelConfig)


def load_trainable(generator: DLoRALGenerator, tensors: dict[str, Any]) -> None:
    """Copy a checkpoint's generator tensors into ``generator``; every trainable one must be there.

    Raises:
        MissingWeightsError: A trainable tensor is missing or has the wrong shape.
    """
    own = dict(generator.named_parameters())
    trainable = sorted(n for n, p in own.items() if p.requires_grad)
    copy_tensors(own, tensors, trainable, source="the training checkpoint (generator built from its config)")


def restore_generator(checkpoint: TrainingCheckpoint, model_cfg: ModelConfig | None = None, *,
                      weights: str = "raw") -> DLoRALGenerator:
    """The generator of ``checkpoint`` in eval mode: base weights from its model config, trained tensors loaded.

    Args:
        checkpoint: A checkpoint read with ``read_training_checkpoint``.
        model_cfg: Use this model section instead of the stored one (e.g. another ``pretrained_path``).
        weights: ``raw`` trained tensors or their ``ema`` (moving average).
    """
    tensors = checkpoint.generator_tensors(weights)  # before the (slow) build: a missing EMA fails at once
    gen = DLoRALGenerator(model_cfg or stored_model_config(checkpoint.config)).eval()
    load_trainable(gen, tensors)
    return gen
