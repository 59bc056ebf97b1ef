"""Byte sizes and durations at the edges: parse what operators type, format what they read.

Inside lessor every size is an int of bytes and every duration a float of seconds;
GiB and "5m" exist only in config files, CLI output and messages.
"""

from __future__ import annotations

import re

GiB = 1 << 30
MiB = 1 << 20
KiB = 1 << 10
TiB = 1 << 40

# The one rule for sizes (the config reference states it, SIZE_RULE): IEC units and the bare
# letters are binary, SI units are SI. A bare K/M/G/T is binary because a GPU's memory is: a
# "24 GB" card has 24 GiB (nvidia-smi shows 24564 MiB), and Docker's `--memory 8g` and Java's
# `-Xmx8g` count the same way; `GB` is the spelling of a file's size on a model hub, 10^9.
_UNITS = {
    "": 1, "b": 1,
    "ki": KiB, "mi": MiB, "gi": GiB, "ti": TiB,
    "kib": KiB, "mib": MiB, "gib": GiB, "tib": TiB,
    "k": KiB, "m": MiB, "g": GiB, "t": TiB,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
}
SIZE_RULE = ("A size is a number of bytes, or a number with a unit: `KiB`, `MiB`, `GiB`, `TiB` (also `Ki`, `Mi`, "
             "`Gi`, `Ti`) and the bare `K`, `M`, `G`, `T` are binary (`8G` = `8GiB` = 8 × 2^30, as a GPU's memory "
             "is counted); `KB`, `MB`, `GB`, `TB` are SI (`8GB` = 8 × 10^9 = 7.45 GiB). Letter case does not "
             "matter. In a memory field (weights, headroom, capacity, ...) a number without a unit below 1 MiB is "
             "refused, as a unit most likely forgotten, and so is 0 where 0 cannot work (weights, a capacity, a "
             "simulated total). Plans and status print GiB.")
DURATION_RULE = ("A duration is seconds, or a number with `ms`, `s`, `m`, `h` or `d` (`500ms`, `30s`, `5m`, `12h`, "
                 "`7d`); it cannot be negative, except `keep_alive: -1` (or `never`), which means never.")
# The same grammars as JSON-schema patterns, so API clients and fuzzers know what is accepted.
SIZE_PATTERN = r"^\s*[0-9]+(\.[0-9]+)?\s*([kKmMgGtT]([iI]|[iI][bB]|[bB])?|[bB])?\s*$"
DURATION_PATTERN = r"^\s*(-1|never|[0-9]+(\.[0-9]+)?\s*(ms|s|m|h|d)?)\s*$"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_size(value: int | float | str) -> int:
    """Bytes from `8GiB`, `8Gi`, `8G` (binary), `8GB` (SI), `512MiB` or a raw number of bytes."""
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
        raise ValueError(f"'{value}' is not a size: use bytes or a unit such as 512MiB, 8GiB (binary) or 8GB (SI)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def _unitless(value: object) -> bool:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return True
    match = _SIZE.match(value) if isinstance(value, str) else None
    return match is not None and not match.group(2)  # `70272B` says bytes on purpose


def parse_memory_size(value: int | float | str, zero: bool = True) -> int:
    """parse_size for a field of GPU or host memory: `weights: 8` is 8 bytes by the grammar but a
    forgotten unit by every reading, so a unitless number below 1 MiB is refused, saying the unit;
    `zero=False` refuses 0 too, where 0 cannot work (weights, a capacity, a card's total)."""
    size = parse_size(value)
    if size == 0 and not zero:
        raise ValueError("0 bytes cannot work here; write the size with a unit, such as '8GiB'")
    if 0 < size < MiB and _unitless(value):
        raise ValueError(f"{value!r} is {size} byte(s), less than 1 MiB: most likely a unit is missing; "
                         f"write '{str(value).strip()}GiB' or '{str(value).strip()}MiB' "
                         f"(a number without a unit is bytes)")
    return size


def parse_nonzero_memory_size(value: int | float | str) -> int:
    return parse_memory_size(value, zero=False)


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


def parse_duration_or_never(value: int | float | str) -> float:
    """A duration where -1 (or `never`) means never (keep_alive); any other negative number is refused."""
    seconds = parse_duration(value)
    if seconds < 0 and seconds != -1:
        raise ValueError(f"{value!r} is negative: use -1 (or 'never') for never, or a duration such as 30s or 5m")
    return seconds


def parse_nonnegative_duration(value: int | float | str) -> float:
    seconds = parse_duration(value)
    if seconds < 0:
        raise ValueError(f"{value!r} is negative: a duration here is 0 or more, such as 500ms, 30s or 5m")
    return seconds


def format_bytes(n: int) -> str:
    """Human form for messages and tables: 1.0 GiB, 512.0 MiB, 70272 B."""
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, size in (("TiB", 1 << 40), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size:
            return f"{sign}{n / size:.1f} {unit}"
    return f"{sign}{n} B"
