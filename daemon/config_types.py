"""The field types every config section shares: a strict model, durations, HOST:PORT listeners,
names. Their own module so a section may live outside config.py without importing it."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, WithJsonSchema

from .units import DURATION_PATTERN, parse_duration

Duration = Annotated[float, BeforeValidator(parse_duration), WithJsonSchema(
    {"anyOf": [{"type": "number"}, {"type": "string", "pattern": DURATION_PATTERN, "examples": ["30s", "5m", "-1"]}]})]
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
