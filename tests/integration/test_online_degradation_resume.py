"""Online LQ in real training (docs/DATA.md 1.8): kill -9 and a rerun on shards with ``lq=online`` give the
uninterrupted run's final checkpoint bit for bit, with 2 loader workers before the kill and none after.

The helpers of ``test_shard_resume`` (same folder) start and kill the runs; the shard set is the same kind
of 12-clip set, its LQ made on the device (CPU here) from the HR crops. About 2 minutes on 2 cores, so it
is marked slow; the default suite checks the same determinism at the loader level
(``tests/unit/test_online_degradation.py``).
"""

from __future__ import annotations

import random
import signal

import pytest
from helpers.shard_sets import write_good_set
from helpers.state_compare import assert_same_training_state, load_checkpoint
from test_shard_resume import N, finish, fit_command, kill_after_steps, newest_step, shard_overrides, start

from dlightning.contracts.checkpoint_format import step_checkpoint_name


@pytest.mark.slow
def test_kill_9_and_rerun_with_online_lq_is_bit_identical(tmp_path):
    folder = tmp_path / "shards"
    write_good_set(folder, name="v", kind="video", num_shards=4, per_shard=3, seed=8)
    online = (f"data.sources=[{{path: {folder}, weight_consistency: 1.0, weight_detail: 1.0, lq: online, "
              "preset: realesrgan}]",)
    straight_dir, killed_dir = tmp_path / "straight", tmp_path / "killed"
    straight = start(fit_command(shard_overrides(straight_dir, folder, N, workers=0, extra=online)))
    killed = start(fit_command(shard_overrides(killed_dir, folder, N, workers=2, extra=online)))
    step = random.randint(2, N - 3)
    try:
        kill_after_steps([(killed, killed_dir, step)])
    finally:
        if killed.poll() is None:
            killed.kill()
    killed.communicate(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    if newest_step(killed_dir / "checkpoints") >= N:
        pytest.fail(f"the run ended before the kill at step {step}; raise N")
    finish([start(fit_command(shard_overrides(killed_dir, folder, N, workers=0, extra=online))), straight])
    expected = load_checkpoint(straight_dir / "checkpoints" / step_checkpoint_name(N))
    resumed = load_checkpoint(killed_dir / "checkpoints" / step_checkpoint_name(N))
    assert resumed["VSRDataModule"]["resume_count"] == 1
    try:
        assert_same_training_state(expected, resumed)
    except AssertionError as err:
        raise AssertionError(f"online LQ, 2 workers killed after step {step}, rerun with 0: {err}") from err
