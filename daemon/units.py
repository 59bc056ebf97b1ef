"""Byte sizes and durations at the edges: parse what operators type, format what they read.

Inside lessor every size is an int of bytes and every duration a float of seconds;
GiB and "5m" exist only in config files, CLI output and messages.
"""

from __future__ import annotations

import re

GiB = 1 << 30
MiB = 1 << 20
KiB = 1 << 10

_UNITS = {
    "": 1, "b": 1,
    "kib": KiB, "mib": MiB, "gib": GiB, "tib": 1 << 40,
    "k": KiB, "m": MiB, "g": GiB, "t": 1 << 40,  # bare suffixes mean binary units, as in nvidia-smi
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
}
# The same grammars as JSON-schema patterns, so API clients and fuzzers know what is accepted.
SIZE_PATTERN = r"^\s*[0-9]+(\.[0-9]+)?\s*([kKmMgGtT]([iI][bB]|[bB])?|[bB])?\s*$"
DURATION_PATTERN = r"^\s*(-1|never|[0-9]+(\.[0-9]+)?\s*(ms|s|m|h|d)?)\s*$"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_size(value: int | float | str) -> int:
    """Bytes from `8GiB`, `8GB`, `512MiB`, `1.5G` or a raw number of bytes."""
    if isinstance(value, bool):
        raise ValueError("a size must be a number of bytes or a string like '8GiB', not a boolean")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"a size cannot be negative (got {value})")
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"a size in bytes must be a whole number (got {value}); or write a unit, such as '1.5GiB'")
        return int(value)
    match = _SIZE.match(str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"'{value}' is not a size: use bytes or a unit such as 512MiB, 8GiB, 8GB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def parse_duration(value: int | float | str) -> float:
    """Seconds from `300`, `5m`, `1h`, `-1` (never); negative numbers pass through as 'never'."""
    if isinstance(value, bool):
        raise ValueError("a duration must be seconds or a string like '5m', not a boolean")
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip()
    if text in ("-1", "never"):
        return -1.0
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"'{value}' is not a duration: use seconds or 500ms, 30s, 5m, 1h, or -1 for never")
    return float(match.group(1)) * _SECONDS[match.group(2)]


def format_bytes(n: int) -> str:
    """Human form for messages and tables: 1.0 GiB, 512.0 MiB, 70272 B."""
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, size in (("TiB", 1 << 40), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size:
            return f"{sign}{n / size:.1f} {unit}"
    return f"{sign}{n} B"
