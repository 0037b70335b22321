"""Configuration: the one validated `Settings` object that every other package receives."""

from config.settings import CONFIG_ENV, Settings, load_settings

__all__ = ["CONFIG_ENV", "Settings", "load_settings"]
