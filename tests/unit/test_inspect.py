"""Weight-free inspection of the trainable set: tiny self-consistency and the SD 2.1 base numbers."""

from __future__ import annotations

from torch import nn

from dlightning.models.components import load_components
from dlightning.models.config import LoraConfig, ModelConfig
from dlightning.models.inspect import format_inspection, inspect_model
from dlightning.models.lora import select_lora_targets
from dlightning.models.unet import expand_conv_in


def _analytic_lora_params(module: nn.Module, r: int) -> int:
    """A (in -> r, same kernel) plus B (r -> out, 1x1) of one peft LoRA branch."""
    if isinstance(module, nn.Linear):
        return r * module.in_features + module.out_features * r
    k = module.kernel_size[0] * module.kernel_size[1]
    return r * module.in_channels * k + module.out_channels * r


def test_tiny_report_matches_an_analytic_count():
    cfg = ModelConfig(preset="tiny", lora=LoraConfig(rank_consistency=4, rank_detail=2))
    report = inspect_model(cfg)
    unet = load_components(cfg, parts=("unet",)).unet
    expand_conv_in(unet)
    targets = select_lora_targets(n for n, _ in unet.named_parameters())
    modules = dict(unet.named_modules())
    for group, names in targets.items():
        row = report["groups"][group]
        assert row["modules"] == len(names)
        assert row["consistency"] == sum(_analytic_lora_params(modules[n], 4) for n in names)
        assert row["detail"] == sum(_analytic_lora_params(modules[n], 2) for n in names)
    fam = report["families"]
    assert fam["consistency"] == sum(report["groups"][g]["consistency"] for g in targets)
    assert report["lora_total"] == fam["consistency"] + fam["detail"]
    c = unet.conv_in.out_channels
    assert report["conv_in"] == 8 * c * 9 + c
    parts = report["lora_total"] + report["conv_in"] + report["cfr_cross_attention"]
    assert report["trainable_total"] == parts
    assert "conv_in" in format_inspection(report)


def test_tiny_report_equals_the_real_generator(tiny_generator):
    report = inspect_model(tiny_generator.cfg)
    groups = tiny_generator.parameter_groups()
    count = {k: sum(p.numel() for p in v) for k, v in groups.items()}
    assert report["families"] == {"consistency": count["c_lora"], "detail": count["d_lora"]}
    assert report["conv_in"] == count["conv_in"] and report["cfr_cross_attention"] == count["cfr"]


def test_sd21_base_numbers_match_the_reference():
    report = inspect_model(ModelConfig(preset="sd21_meta"))
    modules = {g: r["modules"] for g, r in report["groups"].items()}
    assert modules == {"encoder": 94, "decoder": 148, "mid": 16}
    for family in ("consistency", "detail"):
        assert {g: r[family] for g, r in report["groups"].items()} == {
            "encoder": 1_253_920, "decoder": 2_425_104, "mid": 376_832}
        assert report["families"][family] == 4_055_856
    assert report["lora_total"] == 8_111_712
    assert report["conv_in"] == 23_360
    assert report["cfr_cross_attention"] == 11_013
    text = format_inspection(report)
    assert "4,055,856" in text and "8,111,712" in text


def test_sd21_preset_reads_only_the_unet_config(tiny_pretrained_dir, tmp_path):
    import shutil

    folder = tmp_path / "sd"
    (folder / "unet").mkdir(parents=True)
    shutil.copy(tiny_pretrained_dir / "unet" / "config.json", folder / "unet" / "config.json")
    from_config = inspect_model(ModelConfig(preset="sd21", pretrained_path=str(folder)))
    tiny = inspect_model(ModelConfig(preset="tiny"))
    assert {k: v for k, v in from_config.items() if k != "preset"} == {
        k: v for k, v in tiny.items() if k != "preset"}
