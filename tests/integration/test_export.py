"""Export: merged model equals the unmerged generator, plain 8-channel UNet, refusal rules, reference pkl."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers.media import randomized_generator, tiny_model_config
from helpers.run_checkpoint import write_run_checkpoint

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


def test_a_format_1_export_still_loads(gen, lq, tmp_path):
    """Format 1 kept CFR as one cfr.safetensors file (reference keys) and had no diffusers files."""
    import shutil

    from safetensors.torch import load_file, save_file

    out = export_generator(copy.deepcopy(gen), tmp_path / "e")
    cfr = load_file(str(out / "cfr" / "diffusion_pytorch_model.safetensors"))
    shutil.rmtree(out / "cfr")
    save_file({k: v for k, v in cfr.items() if k not in ("spynet.mean", "spynet.std")}, str(out / "cfr.safetensors"))
    meta = json.loads((out / "dlightning_export.json").read_text())
    (out / "dlightning_export.json").write_text(json.dumps({**meta, "format": 1}))
    got, _ = _exported(out, lq)
    assert (got - _unmerged(gen, lq, 1.0, 1.0)).abs().max() < TOL


# ------------------------------------------------------------------------------------------ adapters
ADAPTER_TOL = 1e-5
"""Max difference between the adapter export applied to the base UNet and the merged export's UNet."""


def _base_unet_with_adapters(folder, scales):
    """The documented recipe (the model card's snippet): base UNet, 8-channel conv_in, both LoRA files."""
    from safetensors.torch import load_file

    from dlightning.models.tiny import build_tiny_modules

    unet = build_tiny_modules(0, ("unet",))["unet"]  # the tiny preset's base UNet (seed 0)
    conv = load_file(str(folder / "conv_in.safetensors"))
    old = unet.conv_in
    unet.conv_in = torch.nn.Conv2d(conv["weight"].shape[1], old.out_channels, old.kernel_size, old.stride,
                                   old.padding)
    unet.conv_in.load_state_dict(conv)
    unet.register_to_config(in_channels=unet.conv_in.in_channels)
    for family in ("consistency", "detail"):
        unet.load_lora_adapter(str(folder), weight_name=f"lora_{family}.safetensors", prefix="unet",
                               adapter_name=family)
    unet.set_adapters(["consistency", "detail"], weights=[scales["consistency"], scales["detail"]])
    return unet.eval()


def test_adapter_export_on_the_base_unet_equals_the_merged_unet(gen, tmp_path):
    from diffusers import UNet2DConditionModel

    cfg = {"scale_consistency": 1.0, "scale_detail": 0.5}
    export_generator(copy.deepcopy(gen), tmp_path / "m", ExportConfig(**cfg))
    export_generator(copy.deepcopy(gen), tmp_path / "a", ExportConfig(adapters=True, **cfg))
    meta = json.loads((tmp_path / "a" / "dlightning_adapters.json").read_text())
    assert meta["kind"] == "adapters" and meta["scales"] == {"consistency": 1.0, "detail": 0.5}
    assert meta["families"]["detail"]["rank"] == 4 and meta["families"]["consistency"]["alpha"] == 8.0
    adapted = _base_unet_with_adapters(tmp_path / "a", meta["scales"])
    merged = UNet2DConditionModel.from_pretrained(tmp_path / "m" / "unet").eval()
    g = torch.Generator().manual_seed(0)
    x, emb = torch.randn(2, 8, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        got = adapted(x, torch.tensor([1, 1]), encoder_hidden_states=emb).sample
        want = merged(x, torch.tensor([1, 1]), encoder_hidden_states=emb).sample
    assert (got - want).abs().max() < ADAPTER_TOL  # measured 3e-6 (outputs of size ~3)
    adapted.fuse_lora()
    adapted.unload_lora()
    ours, theirs = adapted.state_dict(), merged.state_dict()
    assert set(ours) == set(theirs)
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) < ADAPTER_TOL  # measured 0
    assert (tmp_path / "a" / "cfr" / "dloral_cfr.py").is_file()
    assert "load_lora_adapter" in (tmp_path / "a" / "README.md").read_text()


# ------------------------------------------------------------------------------------------ file modes
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_export_modes_are_those_of_files_the_user_creates(gen, tmp_path, umask):
    import os
    import stat

    old = os.umask(umask)
    try:
        out = export_generator(copy.deepcopy(gen), tmp_path / "e", ExportConfig(adapters=umask != 0o022))
    finally:
        os.umask(old)
    modes = {p.relative_to(out).as_posix() or ".": stat.S_IMODE(p.stat().st_mode)
             for p in [out, *out.rglob("*")]}
    files = {k: m for k, m in modes.items() if (out / k).is_file()}
    folders = {k: m for k, m in modes.items() if (out / k).is_dir()}
    assert any(k.endswith(".safetensors") for k in files)  # safetensors writes 0600 on its own
    assert set(files.values()) == {0o666 & ~umask}, files
    assert set(folders.values()) == {0o777 & ~umask}, folders


# ------------------------------------------------------------------------------------------ model card, config
def test_model_card_records_config_scales_command_and_validation(gen, tmp_path):
    from dlightning.cli import main

    ckpt = write_run_checkpoint(gen, tmp_path / "run", tiny_model_config())
    metrics = tmp_path / "run" / "validation" / "step-00000003" / "metrics.json"
    metrics.parent.mkdir(parents=True)
    metrics.write_text(json.dumps({"step": 3, "val/psnr": 23.4567, "val/ssim": 0.71, "val/ewarp": float("nan"),
                                   "per_clip": [{"psnr": 23.4567}]}))
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "e"), "--scale-detail", "0.75"]) == 0
    card = (tmp_path / "e" / "README.md").read_text()
    for expected in ("tiny preset", "schedule: `custom`", "consistency [0, 999]", "learning rate: 5e-05",
                     "consistency 4, detail 4; alpha 8.0", "consistency (C) 1.0, detail (D) 0.75",
                     "optimizer steps of this checkpoint: 3", f"dlightning export --checkpoint {ckpt} --out "
                     f"{tmp_path / 'e'} --scale-detail 0.75", "| psnr | 23.4567 |", "| ssim | 0.71 |",
                     "| ewarp | undefined (NaN) |",
                     f"dlightning upscale input.mp4 -o output.mp4 --model {tmp_path / 'e'}",
                     "DiffusionPipeline.from_pretrained", "trust_remote_code=True"):
        assert expected in card, expected
    assert json.loads((tmp_path / "e" / "dlightning_export.json").read_text())["optimizer_step"] == 3
    # The run folder as --checkpoint (its newest checkpoint) and the adapter kind: the same metrics.
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "e2"), "--adapters"]) == 0
    card = (tmp_path / "e2" / "README.md").read_text()
    assert "| psnr | 23.4567 |" in card and "LoRA-only adapters" in card
    # Without metrics for that step the card says where it looked.
    metrics.unlink()
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "e3"), "--adapters"]) == 0
    card = (tmp_path / "e3" / "README.md").read_text()
    assert f"No validation metrics for step 3 were found ({tmp_path / 'run' / 'validation'})" in card


def test_export_honours_local_path_overrides_and_refuses_the_rest(gen, lq, tmp_path, caplog):
    from dlightning.cli import main
    from dlightning.models.tiny import save_tiny_pretrained

    # Trained on another machine: the stored config names a base folder that is not here.
    stored = tiny_model_config(preset="sd21", pretrained_path=str(tmp_path / "elsewhere" / "sd21"))
    ckpt = write_run_checkpoint(gen, tmp_path / "run", stored)
    base = save_tiny_pretrained(tmp_path / "sd21_here", seed=0)  # the same weights as the tiny preset
    out = ["--out", str(tmp_path / "e")]
    assert main(["export", "--checkpoint", str(ckpt), *out]) == 2  # the stored path is missing
    assert "elsewhere" in caplog.text
    assert not (tmp_path / "e").exists()
    paths = tmp_path / "paths.yaml"
    paths.write_text(f"model:\n  pretrained_path: {base}\n")
    assert main(["export", "--checkpoint", str(ckpt), "--config", str(paths), *out]) == 0
    got, _ = _exported(tmp_path / "e", lq)
    assert (got - _unmerged(gen, lq, 1.0, 1.0)).abs().max() < TOL
    meta = json.loads((tmp_path / "e" / "dlightning_export.json").read_text())
    assert meta["model_config"]["pretrained_path"] == str(base)
    caplog.clear()
    for refused, shown in ((f"model.pretrained_path={base}", "model.lora.rank_detail"),
                           ("optim.lr=1.0", "optim.lr"), ("export.dtype=fp16", "export")):
        extra = ["model.lora.rank_detail=8"] if shown == "model.lora.rank_detail" else []
        assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "r"), refused, *extra]) == 2
        assert shown in caplog.text
        caplog.clear()
    assert not (tmp_path / "r").exists() and not list(tmp_path.glob("r.tmp*"))
    assert main(["export", "--checkpoint", str(ckpt), "--reference-pkl", "x.pkl", "--out", str(tmp_path / "r")]) == 2
