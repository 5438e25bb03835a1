"""Parse and format sizes ("4GiB") and durations ("30s"), as the TOML config and the CLI write them.

Rule: a parse either returns a non-negative number or raises ValueError naming the text.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1 << 10,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1 << 20,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1 << 30,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1 << 40,
}
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_NUMBER_UNIT = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: str | int) -> int:
    """Return a byte count from ``4096``, ``"64MiB"`` or ``"1.5 GiB"``. Raises ValueError."""
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size must not be negative: {value}")
        return value
    match = _NUMBER_UNIT.match(value)
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f'not a size: {value!r} (examples: 4096, "64MiB", "4GiB")')
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def parse_duration(value: str | int | float) -> float:
    """Return seconds from ``30``, ``"250ms"``, ``"30s"``, ``"5m"``, ``"24h"``. Raises ValueError."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"duration must not be negative: {value}")
        return float(value)
    match = _NUMBER_UNIT.match(value)
    unit = match.group(2).lower() if match else ""
    if not match or (unit and unit not in _DURATION_UNITS):
        raise ValueError(f'not a duration: {value!r} (examples: "250ms", "30s", "24h")')
    return float(match.group(1)) * _DURATION_UNITS.get(unit, 1.0)


def duration_option(accept: Callable[[float], bool], refusal: str) -> Callable[[str], float]:
    """An argparse ``type=`` for a duration option: seconds from :func:`parse_duration`, kept
    only when ``accept(seconds)``; otherwise ``refusal`` (``{text}``: the text given) is the
    usage error argparse prints."""

    def parse(text: str) -> float:
        try:
            seconds = parse_duration(text)
        except (ValueError, TypeError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        if not accept(seconds):
            raise argparse.ArgumentTypeError(refusal.format(text=text))
        return seconds

    return parse


def format_size(n: float) -> str:
    """Human-readable binary size: ``1.5 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
