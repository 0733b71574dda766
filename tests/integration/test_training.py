"""The LightningModule trained for real on the tiny model with synthetic 32x32 clips (CPU, accumulation 2).

One observed run (consistency 0-2, detail 3-5, consistency 6-7) backs several tests: the objective of each
phase falls on a fixed held-out batch, inactive groups get neither update nor weight decay, per-group
clipping, moment reset on phase entry, checkpoint contents. Smaller runs cover non-finite losses, keeping
the moments, and the CLI.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from helpers import train_probe
from lightning.pytorch import Callback

from dlightning.contracts.phases import PARAM_GROUPS as GROUPS

CLIP = {"c_lora": 1e-3, "cfr": 2e-3, "d_lora": 1.5e-3, "conv_in": 3e-3}
"""Different tiny limits per group, so clipping is active and per group (not one global norm)."""
BETA1, BETA2 = 0.9, 0.999



probe = train_probe


def make_cfg(run_dir: Path, steps: int, *, c_end: int, d_end: int, extra: list[str] | None = None):
    from dlightning.config import load_config

    return load_config([probe.DEMO_CONFIG], probe.tiny_overrides(run_dir, steps, c_end=c_end, d_end=d_end,
                                                                  extra=extra))


def fit_observed(cfg, monkeypatch, patch=None, callbacks=()):
    """``train.fit`` with ``patch(module)`` applied to the module right after it is built."""
    from dlightning import train

    built = []
    original = train.build_module

    def build(*args, **kwargs):
        module = original(*args, **kwargs)
        if patch is not None:
            patch(module)
        built.append(module)
        return module

    monkeypatch.setattr(train, "build_module", build)
    try:
        train.fit(cfg, fresh=True, callbacks=list(callbacks))
    finally:
        monkeypatch.setattr(train, "build_module", original)
    return built[0]


def _equal(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> list[bool]:
    return [torch.equal(x, y) for x, y in zip(xs, ys, strict=True)]


def group_params(module) -> dict[str, list[torch.nn.Parameter]]:
    return {name: list(ps) for name, ps in module.generator.parameter_groups().items()}


def optimizer_of(module) -> torch.optim.Optimizer:
    opt = module.optimizers()
    return opt.optimizer if hasattr(opt, "optimizer") else opt


class Recorder(Callback):
    """At every optimizer-step boundary: trainable tensors and the Adam state per group (clones)."""

    def __init__(self) -> None:
        self.params: dict[int, dict[str, list[torch.Tensor]]] = {}
        self.adam: dict[int, dict[str, list[dict[str, torch.Tensor]]]] = {}

    def _record(self, module) -> None:
        step = module.optimizer_step
        opt = optimizer_of(module)
        groups = group_params(module)
        self.params[step] = {g: [p.detach().clone() for p in ps] for g, ps in groups.items()}
        self.adam[step] = {g: [{k: v.clone() for k, v in opt.state.get(p, {}).items()} for p in ps]
                           for g, ps in groups.items()}

    def on_train_start(self, trainer, pl_module) -> None:
        self._record(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.at_step_boundary:
            self._record(pl_module)


class HeldOutEval(Callback):
    """Evaluates ``compute_losses`` on a fixed batch (and fixed CSD draws) at the given optimizer steps."""

    def __init__(self, cfg, at_steps: set[int]) -> None:
        from dlightning.data.synthetic import SyntheticBatchBuilder

        self.at_steps = at_steps
        builder = SyntheticBatchBuilder(cfg.data, rank=99, phase_fn=lambda m: "consistency")
        batches = [builder.build(m) for m in range(2)]
        self.batch = {"hr": torch.cat([b["hr"] for b in batches]),
                      "lq": torch.cat([b["lq"] for b in batches]),
                      "caption": [c for b in batches for c in b["caption"]]}
        self.losses: dict[tuple[int, str], dict[str, float]] = {}

    def _evaluate(self, module) -> None:
        from dlightning.training.schedule import phase_at

        for phase_step in sorted(self.at_steps):
            spec = phase_at(phase_step, module.schedule_cfg)
            # the same CSD draws at every evaluation, and the training's own stream untouched
            fixed = torch.Generator().manual_seed(0)
            with torch.no_grad(), mock.patch.object(module.rng, "generator", return_value=fixed):
                out = module.compute_losses(self.batch, spec)
            self.losses[module.optimizer_step, spec.phase + str(spec.segment)] = {
                k: float(v) for k, v in out.items() if v.numel() == 1}

    def on_train_start(self, trainer, pl_module) -> None:
        self._evaluate(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.at_step_boundary and pl_module.optimizer_step in self.at_steps:
            self._evaluate(pl_module)


def spy_clipping(records: list[dict[str, Any]]):
    """Patch ``on_before_optimizer_step`` to keep every group's gradients before and after drop + clip."""
    from dlightning.training.schedule import phase_at

    def patch(module) -> None:
        original = module.on_before_optimizer_step

        def spy(optimizer) -> None:
            before = {g["name"]: [None if p.grad is None else p.grad.detach().clone() for p in g["params"]]
                      for g in optimizer.param_groups}
            original(optimizer)
            after = {g["name"]: [None if p.grad is None else p.grad.detach().clone() for p in g["params"]]
                     for g in optimizer.param_groups}
            records.append({"step": module.optimizer_step,
                            "phase": phase_at(module.optimizer_step, module.schedule_cfg).phase,
                            "before": before, "after": after})

        module.on_before_optimizer_step = spy

    return patch


# ------------------------------------------------------------------------------- the observed run
MAIN_STEPS, MAIN_C_END, MAIN_D_END = 8, 2, 5
PHASE_STEPS = {"consistency0": (0, 3), "detail1": (3, 6), "consistency2": (6, 8)}
"""Held-out objective of each segment, evaluated when the segment starts and when it ends. lr 3e-3: at
1e-3 three steps barely move the tiny model, at 1e-2 Adam overshoots and batch noise dominates."""


@pytest.fixture(scope="module")
def main_run(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    run_dir = tmp_path_factory.mktemp("main_run")
    clip = [f"optim.clip_norm.{g}={v}" for g, v in CLIP.items()]
    cfg = make_cfg(run_dir, MAIN_STEPS, c_end=MAIN_C_END, d_end=MAIN_D_END,
                   extra=["optim.lr=3e-3", "optim.weight_decay=0.05",
                          "optim.reset_moments_on_phase_entry=true",
                          f"trainer.checkpoint_every={MAIN_STEPS}", *clip])
    recorder, clips = Recorder(), []
    held_out = HeldOutEval(cfg, {0, 3, 6, 8})
    try:
        module = fit_observed(cfg, mp, patch=spy_clipping(clips), callbacks=[recorder, held_out])
    finally:
        mp.undo()
    return {"module": module, "recorder": recorder, "clips": clips, "held_out": held_out, "run_dir": run_dir,
            "cfg": cfg}


@pytest.mark.parametrize("segment", list(PHASE_STEPS))
def test_each_phase_lowers_its_objective_on_held_out_data(main_run, segment):
    start, end = PHASE_STEPS[segment]
    losses = main_run["held_out"].losses
    before, after = losses[start, segment], losses[end, segment]
    # "loss" is the phase's weighted objective on the same batch with the same CSD draws at both times
    assert after["loss"] < 0.995 * before["loss"], (segment, before, after)


def test_inactive_groups_get_no_update_and_no_weight_decay(main_run):
    params, adam = main_run["recorder"].params, main_run["recorder"].adam
    assert sorted(params) == list(range(MAIN_STEPS + 1))
    for step in range(MAIN_STEPS):
        phase = "consistency" if step <= MAIN_C_END or step > MAIN_D_END else "detail"
        inactive = ("d_lora",) if phase == "consistency" else ("c_lora", "cfr")
        for group in GROUPS:
            moved = [not same for same in _equal(params[step][group], params[step + 1][group])]
            if group in inactive:
                assert not any(moved), f"step {step} ({phase}): inactive {group} changed"
                for sa, sb in zip(adam[step][group], adam[step + 1][group], strict=True):
                    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), group
            else:
                # weight decay > 0 moves every active tensor, even LoRA A whose gradient is still zero
                assert all(moved), f"step {step} ({phase}): only {sum(moved)}/{len(moved)} of {group} moved"


def test_each_active_group_is_clipped_to_its_own_limit(main_run):
    records = main_run["clips"]
    assert [r["step"] for r in records] == list(range(MAIN_STEPS))
    clipped = 0
    for rec in records:
        active = ("c_lora", "cfr", "conv_in") if rec["phase"] == "consistency" else ("d_lora", "conv_in")
        for group in GROUPS:
            after = rec["after"][group]
            if group not in active:
                assert all(g is None for g in after), f"step {rec['step']}: {group} kept gradients"
                continue
            before = torch.cat([g.double().flatten() for g in rec["before"][group]])
            norm = float(before.norm())
            expected_norm = min(norm, CLIP[group])
            got = torch.cat([g.double().flatten() for g in after])
            assert math.isclose(float(got.norm()), expected_norm, rel_tol=1e-3), (rec["step"], group, norm)
            # clipping rescales, it does not change the direction
            torch.testing.assert_close(got, before * (float(got.norm()) / norm), rtol=1e-4, atol=1e-12)
            clipped += norm > CLIP[group]
    assert clipped >= MAIN_STEPS * 2, "the limits were too loose to exercise clipping"


def test_reset_moments_on_phase_entry_clears_entering_groups(main_run):
    adam, clips = main_run["recorder"].adam, main_run["clips"]
    entry = MAIN_D_END + 1  # consistency starts again: c_lora and cfr were frozen and re-enter
    for group in ("c_lora", "cfr"):
        for state, grad in zip(adam[entry + 1][group], clips[entry]["after"][group], strict=True):
            assert float(state["step"]) == 1.0, group  # counted from the phase entry, not from step 0
            # first Adam step from cleared moments: m = (1 - b1) g, v = (1 - b2) g^2
            torch.testing.assert_close(state["exp_avg"], (1 - BETA1) * grad, rtol=1e-5, atol=1e-12)
            torch.testing.assert_close(state["exp_avg_sq"], (1 - BETA2) * grad * grad, rtol=1e-5, atol=1e-18)
    # conv_in trains in every phase (its moments are never stale) and d_lora was frozen meanwhile: both keep
    # their state
    assert {float(s["step"]) for s in adam[entry + 1]["conv_in"]} == {float(entry + 1)}
    assert {float(s["step"]) for s in adam[entry + 1]["d_lora"]} == {float(MAIN_D_END - MAIN_C_END)}
    # the detail entry found d_lora without state; its first step starts from zero moments as well
    assert {float(s["step"]) for s in adam[MAIN_C_END + 2]["d_lora"]} == {1.0}


def test_checkpoint_holds_only_trainable_tensors(main_run):
    ckpt_path = main_run["run_dir"] / "checkpoints" / f"step-{MAIN_STEPS:08d}.ckpt"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    module = main_run["module"]
    trainable = module.trainable_state_dict()
    assert set(ckpt["state_dict"]) == set(trainable)
    for key, value in ckpt["state_dict"].items():
        assert torch.equal(value, trainable[key]), key
        assert not key.startswith(("generator.vae.", "generator.text_encoder.", "vae.", "text_encoder.")), key
        assert "base_layer" not in key or ".conv_in." in key, key
    n_params = sum(len(ps) for ps in group_params(module).values())
    assert len(ckpt["state_dict"]) == n_params
    total = sum(p.numel() for p in module.parameters())
    saved = sum(v.numel() for v in ckpt["state_dict"].values())
    assert saved < total / 4, "frozen weights leaked into the checkpoint"

    (opt,) = ckpt["optimizer_states"]
    assert [g["name"] for g in opt["param_groups"]] == list(GROUPS)
    assert len(opt["state"]) == n_params
    assert all(set(s) == {"step", "exp_avg", "exp_avg_sq"} for s in opt["state"].values())

    block = ckpt["dlightning"]
    assert block["optimizer_step"] == MAIN_STEPS and block["micro_step"] == 2 * MAIN_STEPS
    assert block["last_phase"] == "consistency"
    _assert_plain(block, "dlightning")


def _assert_plain(value: Any, where: str) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            assert isinstance(k, (str, int)), f"{where}: key {k!r}"
            _assert_plain(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _assert_plain(v, f"{where}[{i}]")
    else:
        assert value is None or isinstance(value, (str, int, float, bool, torch.Tensor)), \
            f"{where} is a {type(value).__name__}"


# ------------------------------------------------------------------------------- smaller runs
def test_reset_moments_off_keeps_state(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path, 3, c_end=0, d_end=1, extra=["optim.reset_moments_on_phase_entry=false"])
    recorder = Recorder()
    fit_observed(cfg, monkeypatch, callbacks=[recorder])
    final = recorder.adam[3]
    assert {float(s["step"]) for s in final["c_lora"]} == {2.0}  # steps 0 and 2, moments carried over
    assert {float(s["step"]) for s in final["conv_in"]} == {3.0}
    assert {float(s["step"]) for s in final["d_lora"]} == {1.0}
    # the carried first moment is not the one-step value of a fresh start
    assert not torch.equal(final["c_lora"][0]["exp_avg"], recorder.adam[1]["c_lora"][0]["exp_avg"])


def _inject_nan(bad_steps: set[int]):
    def patch(module) -> None:
        original = module.compute_losses

        def compute_losses(batch, spec, **kwargs):
            out = original(batch, spec, **kwargs)
            if module.optimizer_step in bad_steps and module.micro_step % 2 == 0:
                # first micro-batch only: one bad micro-batch poisons the whole step
                out["loss"] = out["loss"] * float("nan")
            return out

        module.compute_losses = compute_losses

    return patch


def test_nonfinite_step_is_skipped_and_too_many_stop_the_run(tmp_path, monkeypatch):
    from dlightning.training.nonfinite import NonFiniteLossError

    cfg = make_cfg(tmp_path, 8, c_end=1, d_end=3, extra=["trainer.max_nonfinite_steps=2"])
    recorder = Recorder()
    modules = []

    def patch(module):
        _inject_nan({1, 4, 5})(module)
        modules.append(module)

    with pytest.raises(NonFiniteLossError) as err:
        fit_observed(cfg, monkeypatch, patch=patch, callbacks=[recorder])
    message = str(err.value)
    assert "NaN or inf" in message and "2 consecutive steps" in message
    assert "max_nonfinite_steps" in message  # names the knob
    module = modules[0]
    params = recorder.params
    # step 1 skipped: nothing moved; steps 0, 2 and 3 trained; step 4 skipped, step 5 raised
    for step in (0, 2, 3):
        assert not all(_equal(params[step]["conv_in"], params[step + 1]["conv_in"]))
    for step in (1, 4):
        for group in GROUPS:
            assert all(_equal(params[step][group], params[step + 1][group])), group
    assert float(recorder.adam[2]["conv_in"][0]["step"]) == 1.0  # the skipped step left Adam alone
    assert max(params) == 5
    assert module.nonfinite.skipped_total == 3 and module.nonfinite.consecutive == 2


def test_single_nonfinite_step_is_skipped_and_training_finishes(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path, 3, c_end=0, d_end=1, extra=["trainer.max_nonfinite_steps=2"])
    recorder = Recorder()
    module = fit_observed(cfg, monkeypatch, patch=_inject_nan({1}), callbacks=[recorder])
    assert module.optimizer_step == 3 and module.nonfinite.skipped_total == 1
    for group in GROUPS:
        assert all(_equal(recorder.params[1][group], recorder.params[2][group])), group
    ckpt = torch.load(tmp_path / "checkpoints" / "step-00000003.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["dlightning"]["nonfinite"]["skipped_total"] == 1


def test_cli_fit_runs_and_leaves_checkpoints(tmp_path):
    run_dir = tmp_path / "run"
    overrides = probe.tiny_overrides(run_dir, 2, c_end=0, d_end=5, extra=["trainer.checkpoint_every=1"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = Path(sys.executable).with_name("dlightning")  # the console script next to this interpreter
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "dlightning.cli"]
    proc = subprocess.run([*command, "fit", "--config", probe.DEMO_CONFIG, *overrides], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
    assert checkpoints == ["last.ckpt", "step-00000001.ckpt", "step-00000002.ckpt"]
    saved = (run_dir / "config.yaml").read_text()
    assert "synthetic" in saved and "max_steps: 2" in saved
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["dlightning"]["optimizer_step"] == 2
