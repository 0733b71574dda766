"""Experiment tracking: the ``logging`` config section (:mod:`.config`) and Lightning loggers (:mod:`.loggers`)."""
