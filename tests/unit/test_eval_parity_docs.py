"""The parity overlays say what they reproduce, and the method notes name the reference bugs."""

from __future__ import annotations

from helpers.paths import CONFIGS, REPO

from dlightning.config import load_config, to_container


def test_gradient_overlay_is_the_forward_overlay_with_the_temporal_loss_off(tmp_path):
    run = [f"trainer.run_dir={tmp_path}"]
    forward = to_container(load_config([CONFIGS / "sd21.yaml", CONFIGS / "reference_parity_forward.yaml"], run))
    gradient = to_container(load_config([CONFIGS / "sd21.yaml", CONFIGS / "reference_parity_gradient.yaml"], run))
    assert forward["loss"]["temporal"]["mode"] == "warp" and gradient["loss"]["temporal"]["mode"] == "none"
    gradient["loss"]["temporal"]["mode"] = "warp"
    assert gradient == forward
    assert forward["model"]["vae_latent"] == "sample" and forward["trainer"]["precision"] == "16-mixed"


def test_method_notes_name_both_reference_bugs_and_both_overlays():
    method = (REPO / "docs" / "METHOD.md").read_text(encoding="utf-8")
    bugs = method[method.index("## 9. Reference code bugs"):method.index("## 10.")]
    assert "CSD is silently dropped outside fp16" in bugs and "try/except" in bugs and "fp16" in bugs
    assert "hard-coded to 320" in bugs and "expand_conv_in" in bugs
    appendix = method[method.index("## Appendix A"):]
    assert "reference_parity_forward.yaml" in appendix and "reference_parity_gradient.yaml" in appendix
    assert "upscale.reference_io" in appendix
