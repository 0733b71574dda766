"""Exceptions raised for bad user input (configuration, files, data)."""


class ConfigError(ValueError):
    """A configuration value or file is wrong; the message names the key and the fix."""


class MissingWeightsError(FileNotFoundError):
    """A pretrained weight file or folder named in the config is missing or incomplete."""
