"""Reading and showing plain values: JSON read strictly, numbers and times as the contract sends them, and a value
shown short enough for a message."""

from __future__ import annotations

import json
import math
from datetime import datetime
from typing import Any, TypeVar

T = TypeVar("T")


def strict_json(text: str | bytes) -> object:
    """json.loads that refuses what it would read ambiguously or not at all: a repeated key (the last one
    would win silently) and nesting too deep for the parser; both raise ValueError."""

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for key, value in pairs:
            if key in obj:
                raise ValueError(f"the key {short(key)} appears more than once")
            obj[key] = value
        return obj

    try:
        return json.loads(text, object_pairs_hook=unique)
    except RecursionError:
        raise ValueError("nested too deep") from None


def short(value: object) -> str:
    """A value for a message: its repr cut at 60 characters, never a nested value's (it can be deep and long)."""
    if isinstance(value, dict | list):
        return f"a JSON {json_type(value)}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def json_type(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def number(value: object) -> float | None:
    """A JSON number as a finite float; None for anything else, or an integer too large for a float."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        converted = float(value)
    except OverflowError:
        return None
    return converted if math.isfinite(converted) else None


def aware_time(text: str) -> datetime | None:
    """An ISO-8601 time that carries its offset; None for anything else (a time without one is ambiguous)."""
    try:
        parsed = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


def duration(seconds: float) -> str:
    return f"{seconds:.0f}s" if seconds >= 60 else f"{seconds:.1f}s"


def some(item: T | None) -> tuple[T, ...]:
    """An optional warning or problem, as a tuple to join others."""
    return (item,) if item else ()
