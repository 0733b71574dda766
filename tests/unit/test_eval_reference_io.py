"""The reference's PIL / uint8 pre- and post-processing (upscale.reference_io) and per-video prompts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import ToPILImage

from dlightning.inference.prompting import Captioner, format_prompt, load_tagger, peek_first, video_prompt
from dlightning.inference.reference_io import ReferenceWindowRunner, reference_postprocess, reference_preprocess
from dlightning.models.standalone.dloral_frames import WindowSettings


def _frame(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize(("h", "w", "min_short"), [(12, 16, 0), (13, 11, 0), (9, 14, 16)],
                         ids=["multiple_of_8", "odd_sides_lanczos", "enlarged"])
def test_preprocess_is_pils_bicubic_then_lanczos_to_a_multiple_of_8(h, w, min_short):
    frame = _frame(h, w)
    img = Image.fromarray(frame)
    if min(h, w) < min_short:
        f = min_short / min(h, w)
        img = img.resize((int(f * w), int(f * h)), resample=Image.Resampling.BICUBIC)
    img = img.resize((img.width * 4, img.height * 4))  # Pillow's default filter for RGB
    if img.width % 8 or img.height % 8:
        img = img.resize((img.width // 8 * 8, img.height // 8 * 8), resample=Image.Resampling.LANCZOS)
    got = reference_preprocess(frame, 4, min_short)
    assert got.dtype == np.uint8 and got.shape[0] % 8 == 0 and got.shape[1] % 8 == 0
    np.testing.assert_array_equal(got, np.asarray(img))


def _stablesr_adain(target: np.ndarray, source: np.ndarray) -> np.ndarray:
    """AdaIN of the reference's colour fix written out in NumPy: unbiased variance + 1e-5, then sqrt."""
    t, s = target.astype(np.float64) / 255, source.astype(np.float64) / 255
    tm, ts = t.mean((0, 1)), np.sqrt(t.reshape(-1, 3).var(0, ddof=1) + 1e-5)
    sm, ss = s.mean((0, 1)), np.sqrt(s.reshape(-1, 3).var(0, ddof=1) + 1e-5)
    return np.clip((t - tm) / ts * ss + sm, 0, 1)


@pytest.mark.parametrize("color_fix", ["none", "adain"])
def test_postprocess_truncates_twice_like_topilimage_and_resizes_with_pil(color_fix):
    g = torch.Generator().manual_seed(4)
    decoded = torch.rand(2, 3, 16, 24, generator=g) * 2.2 - 1.1  # the VAE output, a little out of range
    lq_up = np.stack([_frame(16, 24, 1), _frame(16, 24, 2)])
    to_pil = ToPILImage()
    expected = []
    for i in range(2):
        first = np.asarray(to_pil((decoded[i].clamp(-1, 1) * 0.5 + 0.5).clamp(0, 1)))
        if color_fix == "adain":
            fixed = torch.from_numpy(_stablesr_adain(first, lq_up[i])).permute(2, 0, 1)
            first = np.asarray(to_pil(fixed))
        expected.append(np.asarray(Image.fromarray(first).resize((12, 8), resample=Image.Resampling.BICUBIC)))
    got = reference_postprocess(decoded.clamp(-1, 1), lq_up, color_fix, (8, 12))
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b)


class _IdentityModel:
    """Model stand-in whose output is its HR input: the runner's pre/post-processing alone shows."""

    unet = None

    def encode_latents(self, up, generator=None):
        return up

    def encode_prompts(self, prompts):
        self.prompts = list(prompts)
        return torch.zeros(len(prompts), 1, 1)

    def denoise(self, up_prev, up_cur, z_prev, z_cur, embeds):
        return z_cur, torch.zeros_like(z_cur)

    def to_x0(self, fused, out):
        return fused - out

    def decode_latents(self, z):
        return z


def test_reference_runner_outputs_pils_frames_and_the_reference_size():
    frames = [_frame(13, 10, s) for s in range(3)]
    settings = WindowSettings(batch_windows=2, min_short_side=0, color_fix="none")
    model = _IdentityModel()
    runner = ReferenceWindowRunner(model, 4, settings, "p", dtype=torch.float32, device=torch.device("cpu"))
    out = list(runner.upscale(frames))
    assert len(out) == 3 and model.prompts == ["p"]
    for got, frame in zip(out, frames, strict=True):
        up = np.asarray(Image.fromarray(frame).resize((40, 52)).resize((40, 48), resample=Image.Resampling.LANCZOS))
        x = torch.from_numpy(up).permute(2, 0, 1).float() / 127.5 - 1  # what the model sees
        np.testing.assert_array_equal(got, np.asarray(ToPILImage()((x * 0.5 + 0.5).clamp(0, 1))))
        assert np.abs(got.astype(int) - up.astype(int)).max() <= 1  # the truncation costs at most one level


def test_prompt_format_is_the_references():
    assert format_prompt(["cat", " grass "]) == "cat, grass, ,"
    assert format_prompt(["cat"], "high quality") == "cat, high quality,"
    assert format_prompt("a cat on grass") == "a cat on grass, ,"


def test_tagger_plugin_sees_the_x4_first_frame(tmp_path, monkeypatch):
    plugin = tmp_path / "my_tagger.py"
    plugin.write_text("def build(path):\n    return lambda image: [f'{image.width}x{image.height}', str(path)]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    tagger = load_tagger("my_tagger:build", "/weights/dape.pth")
    first, rest = peek_first(iter([_frame(6, 8), _frame(6, 8, 1)]))
    assert video_prompt(tagger, first, 4) == "32x24, /weights/dape.pth, ,"
    assert len(list(rest)) == 2  # the peeked frame is still there
    with pytest.raises(Exception, match="module:factory"):
        load_tagger("no_colon", None)


def _tiny_blip(folder):
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    folder.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "cat", "dog", "on", "grass"]
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(words) + "\n")
    tokenizer = BertTokenizer(str(vocab), bos_token="[DEC]")
    processor = BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer)
    text = {"vocab_size": len(words), "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 32, "encoder_hidden_size": 16, "bos_token_id": 5, "pad_token_id": 0,
            "sep_token_id": 3, "eos_token_id": 3}
    vision = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
              "image_size": 32, "patch_size": 16}
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=16))
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_captioner_from_a_local_transformers_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    captioner = Captioner(_tiny_blip(tmp_path / "blip"), max_new_tokens=4)
    caption = captioner(Image.fromarray(_frame(24, 32)))
    assert isinstance(caption, str)
    assert set(caption.split()) <= {"a", "cat", "dog", "on", "grass"}
    assert video_prompt(captioner, _frame(8, 8), 4) == format_prompt(caption)
