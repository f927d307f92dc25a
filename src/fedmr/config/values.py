"""A config value against the type of its default, and values shortened for error messages."""

from __future__ import annotations

import math
from typing import Any

from ..errors import ConfigError


def brief(value: Any) -> str:
    """repr for an error message: long values cut short (and huge integers, which repr refuses, named)."""
    if isinstance(value, int) and abs(value) >= 10**40:
        return f"an integer of about {int(abs(value).bit_length() * 0.30103)} digits"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_type(key: str, value: Any, default: Any) -> Any:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {brief(value)}")
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer, got {brief(value)}")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {brief(value)}")
        try:
            value = float(value)
        except OverflowError:
            raise ConfigError(f"config key '{key}' must be finite, got {brief(value)}") from None
        if not math.isfinite(value):
            raise ConfigError(f"config key '{key}' must be finite, got {value!r}")
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string, got {brief(value)}")
        if "\x00" in value:
            raise ConfigError(f"config key '{key}' contains a NUL character")
    return value
