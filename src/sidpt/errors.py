"""Errors that name the culprit; shared by modules that must not import each other."""


class ConfigError(ValueError):
    """A config value is wrong; the message names the key."""
