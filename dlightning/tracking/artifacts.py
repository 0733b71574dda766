"""A merged export as a W&B model artifact of the training run it came from.

Checkpoint artifacts come from Lightning itself (``logging.wandb_log_model``, see :mod:`.wandb_run`).
An export is written after training, by another command, so this opens the training run again (the id
in ``<run_dir>/wandb_run_id``, ``resume="allow"``), logs the folder and closes the run. Offline, the
artifact waits in ``<run_dir>/logs/wandb/`` for ``wandb sync``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dlightning.contracts.run_layout import logs_dir
from dlightning.errors import ConfigError
from dlightning.tracking.wandb_run import FLUSH_INTERVAL_S, stable_run_id, wandb_mode_decision
from dlightning.utils.logging import get_logger

log = get_logger(__name__)


def log_export_artifact(export_dir: str | os.PathLike[str], run_dir: str | os.PathLike[str], cfg: Any,
                        *, metadata: dict[str, Any] | None = None) -> str | None:
    """Log ``export_dir`` as the model artifact ``export-<run id>`` of the W&B run of ``run_dir``.

    Args:
        export_dir: the export folder (``dlightning export --out``).
        run_dir: the training run folder; its ``wandb_run_id`` names the run.
        cfg: the run's ``logging`` section; nothing is logged unless ``wandb`` is one of its backends
            and the mode is not disabled.
        metadata: stored with the artifact (e.g. the checkpoint's optimizer step).

    Returns:
        The artifact's name, or None when W&B is not in use.

    Raises:
        ConfigError: ``export_dir`` is not a folder.
    """
    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        raise ConfigError(f"{export_dir} is not an export folder; run `dlightning export` first")
    if "wandb" not in cfg.backends:
        return None
    mode, reason = wandb_mode_decision(cfg.wandb_mode)
    if mode == "disabled":
        return None
    import wandb

    run_id = stable_run_id(run_dir)
    save_dir = Path(os.environ.get("WANDB_DIR") or logs_dir(run_dir))
    save_dir.mkdir(parents=True, exist_ok=True)
    log.info("export %s -> W&B run %s in %s mode (%s)", export_dir, run_id, mode, reason)
    run = wandb.init(project=cfg.project, entity=cfg.entity, id=run_id, resume="allow", dir=str(save_dir),
                     mode=mode, job_type="export", tags=list(cfg.wandb_tags) or None, group=cfg.wandb_group,
                     settings=wandb.Settings(x_transaction_log_flush_interval=FLUSH_INTERVAL_S))
    try:
        name = f"export-{run_id}"
        artifact = wandb.Artifact(name, type="model", metadata=metadata or {})
        artifact.add_dir(str(export_dir))
        run.log_artifact(artifact, aliases=["latest"])
    except BaseException:
        run.finish(exit_code=1)
        raise
    run.finish()
    return name
