"""Configuration: typed dataclasses (schema), strict TOML loading (load), cross-field rules (check)."""

from feixing.config.check import check, problems
from feixing.config.load import ConfigError, apply_overrides, field_docs, load, to_dict, to_toml
from feixing.config.schema import Config

__all__ = ["Config", "ConfigError", "check", "problems", "apply_overrides", "field_docs", "load", "to_dict", "to_toml"]
