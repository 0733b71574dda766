"""Strategy construction, cluster plugins under a simulated SLURM job, and the launch sanity check."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader

from dlightning.errors import ConfigError
from dlightning.training.checkpointing import AtomicCheckpointIO
from dlightning.training.config import TrainerConfig
from dlightning.training.strategy import build_cluster_plugins, build_strategy, check_launch_environment

# Task 9 of a 2-node x 8-GPU job: second node, second local GPU.
SLURM_2X8 = {
    "SLURM_JOB_ID": "777",
    "SLURM_JOB_NAME": "dlightning",
    "SLURM_NTASKS": "16",
    "SLURM_NTASKS_PER_NODE": "8",
    "SLURM_TASKS_PER_NODE": "8(x2)",
    "SLURM_NNODES": "2",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_PROCID": "9",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_NODELIST": "gpu[017-018]",
}


@pytest.fixture
def slurm_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.setenv(key, "")  # records the original so Lightning's writes are undone afterwards
        monkeypatch.delenv(key)
    for key, value in SLURM_2X8.items():
        monkeypatch.setenv(key, value)
    return dict(SLURM_2X8)


def _cfg(**kw: object) -> TrainerConfig:
    return TrainerConfig(**{"accelerator": "cpu", "devices": 1, "num_nodes": 1, **kw})


class _ThreeLayers(LightningModule):
    """``c`` -> ``d`` -> ``shared``, bound to a gradient-sync state as C-LoRA, D-LoRA and conv_in."""

    def __init__(self, sync: object = None, *, unused: bool = False) -> None:
        super().__init__()
        self.c, self.d, self.shared = nn.Linear(6, 5), nn.Linear(5, 3), nn.Linear(3, 2)
        self.unused = nn.Linear(2, 2) if unused else None
        self.sync = sync

    def on_fit_start(self) -> None:
        if self.sync is not None:
            self.sync.bind({"c_lora": self.c.parameters(), "d_lora": self.d.parameters(),
                            "conv_in": self.shared.parameters()})
            self.sync.set_phase("consistency")

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.shared(self.d(self.c(batch))).pow(2).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.fixture
def one_process_ddp(monkeypatch: pytest.MonkeyPatch):
    """``fit(strategy, module, steps)`` in this process: a DDP world of one (gloo), torn down afterwards."""
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK"):
        monkeypatch.setenv(key, "")  # records the original so Lightning's writes are undone afterwards
        monkeypatch.delenv(key)

    def fit(strategy: object, module: LightningModule, steps: int) -> None:
        trainer = Trainer(accelerator="cpu", devices=1, strategy=strategy, max_steps=steps, logger=False,
                          enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module, DataLoader(torch.randn(4 * steps, 6), batch_size=4))

    yield fit
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def test_ddp_without_unused_parameter_search(one_process_ddp) -> None:
    strategy = build_strategy(_cfg(strategy="ddp"))
    assert isinstance(strategy, DDPStrategy)
    one_process_ddp(strategy, _ThreeLayers(), 2)  # every parameter in the graph: fine
    # no search for unused parameters: a trainable tensor outside the graph fails the next step
    with pytest.raises(RuntimeError, match="not used in producing the loss"):
        one_process_ddp(build_strategy(_cfg(strategy="ddp")), _ThreeLayers(unused=True), 2)


def test_phase_aware_gradient_sync_hook(one_process_ddp) -> None:
    from dlightning.training.config import OptimConfig
    from dlightning.training.grad_sync import PhaseGradSync, build_grad_sync

    cfg = _cfg(strategy="ddp")
    state = build_grad_sync(cfg, OptimConfig())  # auto + drop_grad masking -> active groups only
    assert isinstance(state, PhaseGradSync) and state.phase_aware
    module = _ThreeLayers(state)
    one_process_ddp(build_strategy(cfg, grad_sync=state), module, 2)
    # the strategy's hook all-reduced through this state, and only the consistency groups' gradients
    active = [*module.c.parameters(), *module.shared.parameters()]
    assert state.bytes_reduced == 2 * sum(4 * p.numel() for p in active)
    assert build_grad_sync(_cfg(strategy="ddp", grad_sync="all"), OptimConfig()) is None
    bf16_all = build_grad_sync(_cfg(strategy="ddp", grad_sync="all", grad_sync_dtype="bf16"), OptimConfig())
    assert bf16_all is not None and not bf16_all.phase_aware
    assert build_grad_sync(cfg, OptimConfig(mask_mode="zero_lr")) is None  # auto -> all under zero_lr


def test_active_sync_refused_without_dropped_gradients() -> None:
    from dlightning.config import load_config

    with pytest.raises(ConfigError, match="grad_sync=all or auto"):
        load_config([], ["trainer.grad_sync=active", "optim.mask_mode=zero_lr"])


def test_auto_is_single_process_or_ddp() -> None:
    from dlightning.training.grad_sync import HookedDDPStrategy

    assert build_strategy(_cfg(strategy="auto")) == "auto"
    assert isinstance(build_strategy(_cfg(strategy="auto", devices=4)), HookedDDPStrategy)  # the ddp above


def test_unknown_strategy_names_choices() -> None:
    with pytest.raises(ConfigError, match="deepspeed_stage_2"):
        build_strategy(_cfg(strategy="fsdp"))


def test_slurm_trainer_sees_ranks(slurm_env: dict[str, str]) -> None:
    plugins = build_cluster_plugins()
    env = next(p for p in plugins if isinstance(p, SLURMEnvironment))
    assert env.auto_requeue is False  # our PreemptionCallback handles the signal, not Lightning
    assert any(isinstance(p, AtomicCheckpointIO) for p in plugins)
    check_launch_environment(8, 2)
    trainer = Trainer(
        accelerator="cpu",
        devices=8,
        num_nodes=2,
        plugins=plugins,
        logger=False,
        strategy=build_strategy(_cfg(strategy="ddp", devices=8, num_nodes=2)),
    )
    assert (trainer.world_size, trainer.global_rank, trainer.local_rank, trainer.node_rank) == (16, 9, 1, 1)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert trainer.strategy.cluster_environment.main_address == "gpu017"


@pytest.mark.parametrize(
    "overrides,devices,nodes,fragment",
    [
        ({}, 4, 2, "--ntasks-per-node=4"),
        ({}, 8, 1, "--nodes=1"),
        ({"SLURM_NTASKS_PER_NODE": "", "SLURM_TASKS_PER_NODE": "8,4"}, 8, 2, "8,4 tasks per node"),
        ({"SLURM_NTASKS": "8"}, 8, 2, "SLURM_NTASKS=8"),
    ],
)
def test_launch_mismatch_is_a_clear_error(
    slurm_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    overrides: dict[str, str],
    devices: int,
    nodes: int,
    fragment: str,
) -> None:
    for key, value in overrides.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match="would hang") as info:
        check_launch_environment(devices, nodes)
    assert fragment in str(info.value)


def test_no_check_outside_slurm_or_interactive(monkeypatch: pytest.MonkeyPatch) -> None:
    check_launch_environment(8, 2, env={})
    check_launch_environment(8, 2, env={**SLURM_2X8, "SLURM_JOB_NAME": "interactive", "SLURM_NTASKS": "1"})
    assert not any(isinstance(p, SLURMEnvironment) for p in build_cluster_plugins(env={}))


def test_torchrun_inside_srun_is_not_checked_against_slurm_tasks() -> None:
    # srun starts one task per node, each runs torchrun with 8 workers: SLURM_NTASKS counts nodes
    env = {**SLURM_2X8, "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1", "SLURM_TASKS_PER_NODE": "1(x2)",
           "TORCHELASTIC_RUN_ID": "job777"}
    check_launch_environment(8, 2, env=env)
    with pytest.raises(ConfigError):
        check_launch_environment(8, 2, env={k: v for k, v in env.items() if k != "TORCHELASTIC_RUN_ID"})


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")
def test_deepspeed_refuses_cpu_accelerator_env_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    from dlightning.training.deepspeed_zero import select_deepspeed_accelerator

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    with pytest.raises(ConfigError, match="unset it"):
        select_deepspeed_accelerator("cuda")


def test_ranks_starting_at_different_steps_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from dlightning.training import module as module_mod

    me = SimpleNamespace(optimizer_step=3, micro_step=6)
    monkeypatch.setattr(module_mod, "gather_from_ranks", lambda obj: [obj, obj])
    module_mod.DLoRALModule.on_train_start(me)  # agreement: nothing happens
    monkeypatch.setattr(module_mod, "gather_from_ranks", lambda obj: [obj, (2, 4)])
    with pytest.raises(RuntimeError, match="different checkpoints"):
        module_mod.DLoRALModule.on_train_start(me)


def test_torchrun_environment_wins_over_slurm(slurm_env: dict[str, str]) -> None:
    plugins = build_cluster_plugins(env={**slurm_env, "TORCHELASTIC_RUN_ID": "job777"})
    assert [type(p) for p in plugins] == [TorchElasticEnvironment, AtomicCheckpointIO]


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")
def test_deepspeed_on_cpu_selects_its_cpu_accelerator(monkeypatch: pytest.MonkeyPatch) -> None:
    from dlightning.training.deepspeed_zero import AutocastDeepSpeedPrecision, DLoRALDeepSpeedStrategy

    monkeypatch.setenv("DS_ACCELERATOR", "")  # records the original so the value set below is undone
    monkeypatch.delenv("DS_ACCELERATOR")
    strategy = build_strategy(_cfg(strategy="deepspeed_stage_2", accelerator="cpu", devices=2,
                                   precision="bf16-mixed"), batch_size=3,
                              clip_norm={"c_lora": 0.5, "cfr": 0.5, "d_lora": 0.5, "conv_in": 0.5})
    assert isinstance(strategy, DLoRALDeepSpeedStrategy)
    assert os.environ["DS_ACCELERATOR"] == "cpu"
    config = strategy.config
    assert config["train_micro_batch_size_per_gpu"] == 3  # our loader has no batch sampler to read it from
    assert config["gradient_clipping"] == 0.5
    # DeepSpeed's own bf16 mode would cast the whole module (LPIPS, trainables) to bf16
    assert config["bf16"] == {"enabled": False} and config["fp16"] == {"enabled": False}
    # DeepSpeed's engine disables an outer autocast unless its own torch_autocast section is on (CUDA);
    # no lower-precision modules: gradients are reduced in fp32 as under DDP
    assert config["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    plugin = strategy.precision_plugin
    assert isinstance(plugin, AutocastDeepSpeedPrecision)
    batch = {"hr": torch.zeros(2, dtype=torch.float32)}
    assert plugin.convert_input(batch)["hr"].dtype == torch.float32
    with plugin.forward_context():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


@pytest.mark.parametrize(("clip_norm", "expected"), [
    ({"c_lora": 0.0, "cfr": 0.0, "d_lora": 0.0, "conv_in": 0.0}, 0.0),
    ({"c_lora": 1.0, "cfr": 1.0, "d_lora": 1.0, "conv_in": 1.0}, 1.0),
    ({}, 0.0),
])
def test_global_clip_norm(clip_norm: dict[str, float], expected: float) -> None:
    from dlightning.training.config import global_clip_norm

    assert global_clip_norm(clip_norm) == expected


@pytest.mark.parametrize(("overrides", "fragment"), [
    (["optim.clip_norm={c_lora: 0, cfr: 0, d_lora: 1.0, conv_in: 0}"], "one global norm"),
    (["trainer.precision=16-mixed"], "bf16-mixed or 32-true"),
    (["optim.accumulate=2"], "optim.accumulate must be 1"),
    (["optim.mask_mode=drop_grad"], "drop_grad"),
])
def test_deepspeed_config_errors_name_the_fix(overrides: list[str], fragment: str) -> None:
    from dlightning.config import load_config

    with pytest.raises(ConfigError, match=fragment):
        load_config([], ["trainer.strategy=deepspeed_stage_2", *overrides])


def test_deepspeed_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # makes `import deepspeed` raise ImportError
    with pytest.raises(ConfigError, match="pip install"):
        build_strategy(_cfg(strategy="deepspeed_stage_2", accelerator="cuda"))


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")
def test_deepspeed_wiring() -> None:
    from lightning.pytorch.strategies import DeepSpeedStrategy

    strategy = build_strategy(_cfg(strategy="deepspeed_stage_2", accelerator="cuda", devices=2))
    assert isinstance(strategy, DeepSpeedStrategy)
    assert strategy.config["zero_optimization"]["stage"] == 2
    assert strategy.exclude_frozen_parameters is True
