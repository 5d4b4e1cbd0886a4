"""Errors that reach a person: each carries a message meant to be read, never a traceback."""


class BastionError(Exception):
    """Base for errors the CLI prints as one line."""


class ConfigError(BastionError):
    """The platform file is missing, malformed, or fails validation."""


class ModelStoreError(BastionError):
    """A model folder is missing, incomplete, or does not match its manifest."""


class EngineConfigError(BastionError):
    """A model and profile cannot be combined into a working engine."""
