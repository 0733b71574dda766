"""Mixed precision: bf16 autocast with frozen weights in bf16 while trainable tensors stay fp32."""

from __future__ import annotations

import torch
from helpers.train_probe import DEMO_CONFIG, tiny_overrides

from dlightning.config import load_config
from dlightning.train import fit


def test_bf16_mixed_training_keeps_trainables_fp32_and_updates_them(tmp_path):
    import lightning as L

    seen: dict[str, object] = {}

    class Observe(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["start"] = {k: v.detach().clone() for k, v in pl_module.trainable_state_dict().items()}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            gen = pl_module.generator
            seen["vae_dtype"] = next(gen.vae.parameters()).dtype
            seen["trainable_dtypes"] = {p.dtype for ps in gen.parameter_groups().values() for p in ps}

    cfg = load_config([DEMO_CONFIG], tiny_overrides(tmp_path, 3, c_end=0, d_end=1,
                                                   extra=["trainer.precision=bf16-mixed"]))
    module = fit(cfg, fresh=True, callbacks=[Observe()])
    assert seen["vae_dtype"] == torch.bfloat16  # frozen parts cast down for memory
    assert seen["trainable_dtypes"] == {torch.float32}  # master weights stay fp32
    end = module.trainable_state_dict()
    changed = [k for k in end if not torch.equal(end[k], seen["start"][k])]
    assert changed and all(torch.isfinite(v).all() for v in end.values())
    assert module.optimizer_step == 3 and module.nonfinite.skipped_total == 0
