"""Experiment tracking: the ``logging`` config section (:mod:`.config`), the Lightning loggers of
``logging.backend`` (:mod:`.loggers`), W&B's mode, folder, run id and service (:mod:`.wandb_run`,
:mod:`.credentials`), validation media (:mod:`.media`) and export artifacts (:mod:`.artifacts`)."""
