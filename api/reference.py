"""The config reference and the API table of the README, generated from the config tree and the
route table so the documentation cannot drift from the code. `python -m lessor.api.reference`."""

from __future__ import annotations

import typing
from collections.abc import Sequence

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from ..daemon.config.model_spec import ModelSpec
from ..daemon.config.schema import LessorConfig
from ..daemon.units import (
    DURATION_RULE,
    SIZE_RULE,
    format_bytes,
    parse_duration,
    parse_duration_or_never,
    parse_memory_size,
    parse_nonnegative_duration,
    parse_nonzero_memory_size,
    parse_size,
)
from ..engines.base import EngineArgsBase

SIZES = {parse_size, parse_memory_size, parse_nonzero_memory_size}
DURATIONS = {parse_duration, parse_nonnegative_duration, parse_duration_or_never}


def _validators(annotation, metadata=()) -> set:
    found = {getattr(m, "func", None) for m in metadata}
    for arg in typing.get_args(annotation):
        found |= {getattr(m, "func", None) for m in getattr(arg, "__metadata__", ())}
        found |= _validators(arg)
    return found


def _type_name(field) -> str:
    annotation, validators = field.annotation, _validators(field.annotation, field.metadata)
    optional = type(None) in typing.get_args(annotation)
    if SIZES & validators:
        name = "size"
    elif DURATIONS & validators:
        name = "duration"
    else:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if typing.get_origin(annotation) is typing.Literal:
            name = " / ".join(repr(a) for a in typing.get_args(annotation))
        elif optional and len(args) == 1:
            name = getattr(args[0], "__name__", str(args[0]))
        else:
            name = getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
    return f"{name} or null" if optional else name


def _default(field) -> str:
    if field.default is PydanticUndefined:
        return "" if field.default_factory is not None else "required"
    if isinstance(field.default, BaseModel):
        return ""
    if isinstance(field.default, int) and not isinstance(field.default, bool) and SIZES & _validators(field.annotation, field.metadata):
        return format_bytes(field.default)
    return repr(field.default)


def _models_in(annotation) -> list[type[BaseModel]]:
    args = typing.get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in args for m in _models_in(a)]


def rows(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    out = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        nested = _models_in(field.annotation)
        is_list = typing.get_origin(field.annotation) is list
        out.append((path, "list" if is_list and nested else ("" if nested else _type_name(field)),
                    "" if nested else _default(field), field.description or ""))
        if name == "engine":
            continue  # engine arguments get a table per engine kind
        for sub in nested:
            out += rows(sub, f"{path}[]." if is_list else f"{path}.")
    return out


def engine_classes() -> list[type[EngineArgsBase]]:
    """The engine argument classes the config accepts under `models[].engine`, in the reference's order."""
    return [m for m in _models_in(ModelSpec.model_fields["engine"].annotation) if issubclass(m, EngineArgsBase)]


def engine_rows() -> list[tuple[str, str, str, str]]:
    out = []
    for engine in engine_classes():
        kind = engine.engine_kind()
        out += [(f"engine ({kind}).{p}", t, d, desc) for p, t, d, desc in rows(engine) if p != "kind"]
    return out


def markdown_table(header: tuple[str, ...], body: Sequence[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    return "\n".join(lines)


def config_reference() -> str:
    top = [(f"`{p}`", f"`{t}`" if t else "", f"`{d}`" if d else "", desc) for p, t, d, desc in rows(LessorConfig)]
    engines = [(f"`{p}`", f"`{t}`" if t else "", f"`{d}`" if d else "", desc) for p, t, d, desc in engine_rows()]
    return (f"{SIZE_RULE}\n\n{DURATION_RULE}\n\n"  # the rules every size and duration below follows
            + markdown_table(("field", "type", "default", "meaning"), top) + "\n\nEngine arguments (`models[].engine`, by `kind`):\n\n"
            + markdown_table(("field", "type", "default", "meaning"), engines))


def api_table() -> str:
    from .admin import ROUTES
    return markdown_table(("method", "path", "token", "what"),
                          [(r.method, f"`{r.path}`", "yes" if r.auth else "", r.summary) for r in ROUTES])


def metrics_labels() -> str:
    """Each outcome label of lessor's metrics with its closed set of values (api/metrics.py's OUTCOME_LABELS)."""
    from .metrics import HTTP_CODES, OTHER_CODE, OUTCOME_LABELS
    rows = []
    for metric, (label, allowed) in OUTCOME_LABELS.items():
        if allowed == HTTP_CODES:
            said = (f"an HTTP status of Python's `http.HTTPStatus`, or `499` (the client left, or lessord stopped, before "
                    f"the answer); an engine's status outside them is `{OTHER_CODE}`")
        else:
            said = ", ".join(f"`{value}`" for value in allowed)
        rows.append((f"`{metric}`", label, said))
    return markdown_table(("metric", "label", "its values (no others)"), rows)


def sections() -> dict[str, str]:
    return {"config-reference": config_reference(), "api-table": api_table(), "metrics-labels": metrics_labels()}


def rewrite(text: str) -> str:
    """Replace each generated section between its <!-- NAME:start --> and <!-- NAME:end --> markers."""
    for name, body in sections().items():
        start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
        head, _, rest = text.partition(start)
        _, _, tail = rest.partition(end)
        text = f"{head}{start}\n{body}\n{end}{tail}"
    return text


if __name__ == "__main__":
    import sys
    if sys.argv[1:2] == ["--write"]:
        from pathlib import Path
        path = Path(sys.argv[2])
        path.write_text(rewrite(path.read_text()))
    else:
        for name, body in sections().items():
            print(f"<!-- {name}:start -->\n{body}\n<!-- {name}:end -->\n")
