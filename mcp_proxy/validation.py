"""
attrs validators shared by the classes whose options are checked when they
are made.
"""

from __future__ import annotations

from typing import Any


def positive(instance: Any, attribute: Any, value: Any) -> None:
    """
    A number more than 0 (not a C{bool}).
    """
    if isinstance(value, bool) or not value > 0:
        raise ValueError(f"{attribute.name} must be more than 0, not {value!r}")


def notNegative(instance: Any, attribute: Any, value: Any) -> None:
    """
    A number of 0 or more (not a C{bool}).
    """
    if isinstance(value, bool) or not value >= 0:
        raise ValueError(f"{attribute.name} must be 0 or more, not {value!r}")
