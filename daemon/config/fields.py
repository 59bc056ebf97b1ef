"""The field types every config section shares: a strict model, durations, memory sizes,
HOST:PORT listeners, names. Their own module so a section may live outside config.py without
importing it. The rules of sizes and durations are daemon/units.py's."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, WithJsonSchema

from ..units import (
    DURATION_PATTERN,
    SIZE_PATTERN,
    parse_duration_or_never,
    parse_memory_size,
    parse_nonnegative_duration,
    parse_nonzero_memory_size,
)

_NONNEGATIVE = r"^\s*[0-9]+(\.[0-9]+)?\s*(ms|s|m|h|d)?\s*$"
# A negative duration is refused: only keep_alive's -1 (never) has a meaning.
Duration = Annotated[float, BeforeValidator(parse_nonnegative_duration), WithJsonSchema(
    {"anyOf": [{"type": "number", "minimum": 0}, {"type": "string", "pattern": _NONNEGATIVE,
                                                  "examples": ["30s", "5m"]}]})]
DurationOrNever = Annotated[float, BeforeValidator(parse_duration_or_never), WithJsonSchema(
    {"anyOf": [{"type": "number"}, {"type": "string", "pattern": DURATION_PATTERN, "examples": ["30s", "5m", "-1"]}]})]
_SIZE_SCHEMA = {"anyOf": [{"type": "integer", "minimum": 0},
                          {"type": "string", "pattern": SIZE_PATTERN, "examples": ["8GiB", "512MiB", "8GB"]}]}
# GPU or host memory: a unitless number below 1 MiB is a forgotten unit (units.parse_memory_size).
MemorySize = Annotated[int, BeforeValidator(parse_memory_size), WithJsonSchema(_SIZE_SCHEMA)]
NonzeroMemorySize = Annotated[int, BeforeValidator(parse_nonzero_memory_size), WithJsonSchema(_SIZE_SCHEMA)]
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"'{value}' is not HOST:PORT (e.g. 127.0.0.1:8470)")
    return host.strip("[]"), int(port)


def _listen(value: object) -> str:
    if not isinstance(value, str):  # a BeforeValidator sees the raw YAML value: null, a number, a list
        raise ValueError(f"{value!r} is not HOST:PORT (e.g. 127.0.0.1:8470)")
    parse_listen(value)
    return value


Listen = Annotated[str, BeforeValidator(_listen)]


_ANY_HOST = {"", "0.0.0.0", "::", "*"}
_LOOPBACK = {"127.0.0.1", "localhost"}


def _same_address(a: str, b: str) -> bool:
    return a == b or a in _ANY_HOST or b in _ANY_HOST or {a, b} <= _LOOPBACK


def port_clash(listeners: list[tuple[str, str, int]]) -> str | None:
    """The first of (field, host, port) that listens where another already does, as a message: the
    second to bind would fail at lessord's start, or, for an engine, at its first load."""
    for i, (field, host, port) in enumerate(listeners):
        for other, other_host, other_port in listeners[:i]:
            if port == other_port and _same_address(host, other_host):
                return (f"{field}: port {port} is also {other}'s; the second to listen there would fail: "
                        "give each its own port")
    return None
