"""Captions from a local image-captioning model: a tiny ViT-GPT2 built in-process, nothing downloaded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dlightning.cli import main as dlightning_main
from dlightning.errors import MissingWeightsError
from dlightning.shards.captions import CaptionConfig, build_captioner

WORDS = ["a photo of a cat", "a dog on the grass", "a red car in the street"]


def main(argv: list[str]) -> int:
    """``dlightning shards ARGV`` (what ``python -m data_prep ARGV`` runs)."""
    return dlightning_main(["shards", *argv])


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(WORDS, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[BOS]", "[EOS]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]",
                                   pad_token="[PAD]", unk_token="[UNK]")


def save_tiny_captioner(folder: Path, *, always: str | None = None) -> Path:
    """Save a random tiny ViT-GPT2 captioner (model, tokenizer, image processor) into ``folder``.

    With ``always`` set, the decoder's final LayerNorm ignores its input and its bias points at the one-hot
    embedding of that word, so greedy decoding emits that word at every step whatever the image.
    """
    from transformers import (
        GPT2Config,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTConfig,
        ViTImageProcessor,
    )

    tokenizer = _tokenizer()
    torch.manual_seed(0)
    encoder = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64)
    decoder = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64,
                         add_cross_attention=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    model = VisionEncoderDecoderModel(config=VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder))
    for cfg in (model.config, model.generation_config):
        cfg.decoder_start_token_id = tokenizer.bos_token_id
        cfg.pad_token_id = tokenizer.pad_token_id
        cfg.eos_token_id = tokenizer.eos_token_id
    if always is not None:
        gpt2 = model.decoder.transformer
        with torch.no_grad():
            # Orthonormal (tied) word embeddings: logit of token i = bias[i] after a zeroed LayerNorm scale.
            gpt2.wte.weight.copy_(torch.eye(len(tokenizer), 32))
            gpt2.ln_f.weight.zero_()
            gpt2.ln_f.bias.copy_(5.0 * gpt2.wte.weight[tokenizer.convert_tokens_to_ids(always)])
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def test_model_captioner_emits_the_known_caption(tmp_path: Path) -> None:
    folder = save_tiny_captioner(tmp_path / "cat", always="cat")
    caption = build_captioner(CaptionConfig(mode="model", model_path=str(folder), max_new_tokens=3))
    frames = np.random.default_rng(0).integers(0, 256, (3, 40, 48, 3), dtype=np.uint8)
    assert caption("k", "c", frames) == "cat cat cat"  # max_new_tokens words, special tokens dropped
    long = build_captioner(CaptionConfig(mode="model", model_path=str(folder), max_new_tokens=5))
    assert long("k", "c", frames) == "cat cat cat cat cat"


def test_model_captioner_is_deterministic(tmp_path: Path) -> None:
    folder = save_tiny_captioner(tmp_path / "rand")
    cfg = CaptionConfig(mode="model", model_path=str(folder), max_new_tokens=4)
    rng = np.random.default_rng(1)
    clips = [rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8) for _ in range(2)]
    first = [build_captioner(cfg)("k", "c", c) for c in clips]
    again = [build_captioner(cfg)("k", "c", c) for c in clips]
    assert first == again and all(isinstance(t, str) for t in first)
    vocab = set(" ".join(WORDS).split())
    assert all(set(t.split()) <= vocab and len(t.split()) <= 4 for t in first)


def test_model_path_without_model_files_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(MissingWeightsError, match="captions.model_path"):
        build_captioner(CaptionConfig(mode="model", model_path=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    caption = build_captioner(CaptionConfig(mode="model", model_path=str(tmp_path / "empty")))
    with pytest.raises(MissingWeightsError, match="save_pretrained"):
        caption("k", "c", np.zeros((1, 32, 32, 3), np.uint8))


def test_data_prep_build_writes_model_captions(tmp_path: Path) -> None:
    import webdataset as wds

    from dlightning.contracts.shard_format import read_manifest

    folder = save_tiny_captioner(tmp_path / "dog", always="dog")
    out = tmp_path / "shards"
    code = main(["build", f"output_dir={out}", "name=cap", "hr_size=[32,32]", "num_frames=2", "progress=false",
                 "sources=[{kind: demo, images: [astronaut, coffee], demo_kinds: [image]}]",
                 "captions.mode=model", f"captions.model_path={folder}", "captions.max_new_tokens=2"])
    assert code == 0
    urls = [str(out / rec["file"]) for rec in read_manifest(out)["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert len(samples) == 2
    assert [s["caption.txt"].decode("utf-8") for s in samples] == ["dog dog", "dog dog"]
