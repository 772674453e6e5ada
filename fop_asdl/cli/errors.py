"""The runner's config error, in its own module so that the config and its checks can both raise it."""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type or impossible; the message names the field."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"config field '{field_name}': {message}")
        self.field = field_name
