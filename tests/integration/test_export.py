"""Export: merged model equals the unmerged generator, plain 8-channel UNet, refusal rules, reference pkl."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers.media import randomized_generator, tiny_model_config

from dlightning.errors import ConfigError
from dlightning.export import export_checkpoint, export_generator, export_reference, fuse_families
from dlightning.inference.config import ExportConfig
from dlightning.inference.exported import load_exported
from dlightning.models.lora import set_family_scales

TOL = 1e-4
"""Max abs difference (fp32, tiny model) between merged and unmerged outputs in [-1, 1]."""


@pytest.fixture(scope="module")
def gen():
    return randomized_generator()


@pytest.fixture(scope="module")
def lq():
    return torch.rand(1, 3, 3, 8, 10, generator=torch.Generator().manual_seed(3)) * 2 - 1


def _unmerged(gen, lq, consistency, detail):
    set_family_scales(gen.unet, consistency, detail)
    try:
        with torch.no_grad():
            return gen(lq, gen.encode_prompts([""])).images
    finally:
        set_family_scales(gen.unet, 1.0, 1.0)


def _exported(path, lq):
    model = load_exported(path)
    with torch.no_grad():
        return model(lq, model.encode_prompts([""])).images, model


@pytest.mark.parametrize("detail", [1.0, 0.0], ids=["c_and_d", "consistency_only"])
def test_merged_equals_unmerged(gen, lq, tmp_path, detail):
    expected = _unmerged(gen, lq, 1.0, detail)
    export_generator(copy.deepcopy(gen), tmp_path / "m", ExportConfig(scale_detail=detail))
    got, model = _exported(tmp_path / "m", lq)
    assert (got - expected).abs().max() < TOL
    assert model.unet.config.in_channels == 8 and type(model.unet.conv_in) is torch.nn.Conv2d
    assert not any("lora" in n for n, _ in model.unet.named_parameters())
    meta = json.loads((tmp_path / "m" / "dlightning_export.json").read_text())
    assert meta["fused_families"] == {"consistency": 1.0, "detail": detail}
    assert meta["timestep"] == 1 and meta["x0_rule"] == "residual" and meta["cfr"]["heads"] == 2
    if detail == 0.0:  # the D family really is left out
        assert (got - _unmerged(gen, lq, 1.0, 1.0)).abs().max() > 10 * TOL


def test_checkpoint_export_cli_and_refusals(gen, lq, tmp_path):
    from dlightning.cli import main
    from dlightning.config import RootConfig, to_container

    trainable = {f"generator.{n}": p.detach().clone() for n, p in gen.named_parameters() if p.requires_grad}
    ckpt = tmp_path / "step.ckpt"
    torch.save({"state_dict": trainable,
                "dlightning": {"config": to_container(RootConfig(model=tiny_model_config())),
                               "optimizer_step": 3}}, ckpt)
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "e")]) == 0
    got, model = _exported(tmp_path / "e", lq)
    assert (got - _unmerged(gen, lq, 1.0, 1.0)).abs().max() < TOL
    assert not list(tmp_path.glob("e.tmp*"))
    with pytest.raises(ConfigError, match="already holds an export"):
        export_checkpoint(ckpt, tmp_path / "e")
    with pytest.raises(RuntimeError, match="already fused"):
        fuse_families(model.unet)
    export_checkpoint(ckpt, tmp_path / "e", ExportConfig(overwrite=True, scale_detail=0.0))
    assert json.loads((tmp_path / "e" / "dlightning_export.json").read_text())["fused_families"]["detail"] == 0


def test_reference_pkl_exports_the_same_way(gen, lq, tmp_path):
    from dlightning.models.reference_ckpt import write_reference_checkpoint

    pkl = write_reference_checkpoint(gen, tmp_path / "model.pkl")
    export_reference(pkl, tiny_model_config(), tmp_path / "r")
    got, _ = _exported(tmp_path / "r", lq)
    assert (got - _unmerged(gen, lq, 1.0, 1.0)).abs().max() < TOL
