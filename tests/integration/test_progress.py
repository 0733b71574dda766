"""Progress a person can follow: plain lines per log_every steps when the output is a file, a bar over the
run's optimizer steps on a terminal, and losses Lightning's callbacks can monitor."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

from helpers.train_probe import DEMO_CONFIG, tiny_overrides
from lightning.pytorch import Callback

from dlightning import train
from dlightning.config import load_config
from dlightning.training.progress import StepProgress, format_duration, progress_line


def test_run_redirected_to_a_file_prints_a_line_per_log_every(tmp_path: Path) -> None:
    out = tmp_path / "slurm-1.out"
    overrides = tiny_overrides(tmp_path / "run", 4, c_end=1, d_end=2, extra=["trainer.log_every=2"])
    with out.open("w") as handle:
        code = subprocess.run([sys.executable, "-m", "dlightning", "fit", "--config", DEMO_CONFIG, *overrides],
                              stdout=handle, stderr=subprocess.STDOUT, timeout=600).returncode
    text = out.read_text()
    assert code == 0, text[-3000:]
    lines = re.findall(r"step (\d+)/4 \| (consistency|detail) \| loss [0-9.e-]+ \| l2 .*clips/s.*", text)
    assert [int(step) for step, _ in lines] == [2, 4]
    assert "left" in text and "lr " in text
    assert "Epoch 0/-2" not in text and "/1000" not in text  # Lightning's batch bar is gone


def test_bar_on_a_terminal_counts_optimizer_steps() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Tty()
    progress = StepProgress(10, stream=stream)

    class _Module:
        optimizer_step, at_step_boundary, last_metrics = 3, True, {}

    class _Trainer:
        is_global_zero = True

    progress.on_train_start(_Trainer(), _Module())
    module = _Module()
    module.optimizer_step = 4
    module.last_metrics = {"train/optimizer_step": 4.0, "train/phase": 1.0, "train/loss": 0.5}
    progress.on_train_batch_end(_Trainer(), module, None, None, 0)
    progress.on_train_end(_Trainer(), module)
    shown = stream.getvalue()
    assert "4/10" in shown and "detail" in shown and "loss 0.5" in shown


def test_line_format() -> None:
    line = progress_line(20, 100, {"train/phase": 0.0, "train/loss": 1.25, "train/loss_l2": 0.5,
                                   "train/lr_c_lora": 1e-4, "train/lr_d_lora": 0.0, "train/clips_per_s": 3.5}, 3725)
    assert line == "step 20/100 | consistency | loss 1.25 | l2 0.5 | lr 0.0001 | 3.5 clips/s | 1:02:05 left"
    assert format_duration(59.6) == "0:01:00"


class _Monitored(Callback):
    def __init__(self) -> None:
        self.seen: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if "train/loss" in trainer.callback_metrics:
            self.seen.append(float(trainer.callback_metrics["train/loss"]))


def test_losses_reach_lightning_callback_metrics(tmp_path: Path) -> None:
    seen = _Monitored()
    train.fit(load_config([DEMO_CONFIG], tiny_overrides(tmp_path / "run", 2, c_end=0, d_end=1)), fresh=True,
              callbacks=[seen])
    assert seen.seen and all(v > 0 for v in seen.seen)
