"""The OpenAPI 3.1 document, built from the route table and the pydantic body models."""

from __future__ import annotations

from typing import Any

from pydantic.json_schema import models_json_schema

from .. import __version__
from .schemas import ErrorOut

REF = "#/components/schemas/{model}"


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}}}


def build_openapi(routes) -> dict[str, Any]:
    models = {ErrorOut} | {m for r in routes for m in (r.body, r.response) if m is not None}
    _, defs = models_json_schema([(m, "validation" if any(r.body is m for r in routes) else "serialization")
                                  for m in sorted(models, key=lambda m: m.__name__)], ref_template=REF)
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route)
    return {
        "openapi": "3.1.0",
        "info": {"title": "lessor admin API", "version": __version__},
        "paths": paths,
        "components": {"schemas": defs["$defs"] if "$defs" in defs else defs,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


def _operation(route) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": route.summary, "operationId": route.handler.__name__, "responses": {}}
    params = [part[1:-1] for part in route.path.split("/") if part.startswith("{")]
    parameters = [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}} for p in params]
    parameters += [{"name": q, "in": "query", "required": False, "schema": {"type": "string"}} for q in route.query]
    if parameters:
        op["parameters"] = parameters
    if route.body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": {"$ref": REF.format(model=route.body.__name__)}}}}
        op["responses"]["400"] = _error("Malformed body or parameter; `field` names it")
    if route.response is not None:
        schema: dict[str, Any] = {"$ref": REF.format(model=route.response.__name__)}
        if route.many:
            schema = {"type": "array", "items": schema}
        op["responses"]["200"] = {"description": "OK", "content": {"application/json": {"schema": schema}}}
    else:
        op["responses"]["200"] = {"description": "OK", "content": {route.content_type: {"schema": {}}}}
    if route.auth:
        op["security"] = [{"bearer": []}]
        op["responses"]["401"] = _error("Missing or wrong bearer token")
    op["responses"].update(_errors_of(route))
    return op


def _errors_of(route) -> dict[str, Any]:
    """The error answers a route documents beyond 400/401 (what its handler can raise)."""
    out: dict[str, Any] = {}
    if "{name}" in route.path:
        out["404"] = _error("Unknown model" + (", or it has no log yet" if route.path.endswith("/log") else ""))
    if route.method == "POST" and "{name}" in route.path:
        out.update({"409": _error("The model is loading or unloading"),
                    "422": _error("The engine parameters break an engine rule"),
                    "501": _error("No adapter for the model's engine"),
                    "502": _error("The engine failed during the load; leases rolled back"),
                    "503": _error("Not enough memory even after the policy's evictions, or the "
                                  "ledger's database refused the write")})
    if route.method == "POST" and route.path.endswith("/plan"):
        out["404"] = _error("Unknown model")
        out["422"] = _error("The engine parameters break an engine rule")
    if "model" in route.query:
        out["404"] = _error("Unknown model (?model=)")
    if "{key}" in route.path:
        out["404"] = _error("No fingerprint with this key")
    if route.method == "DELETE" and "/fingerprints/" in route.path:
        out["503"] = _error("The ledger's database refused the write")
    if route.path.endswith("/reload"):
        out.update({"400": _error("The file was refused (invalid, a change that needs a restart, or an error of "
                                  "check-config's checks); the running config is kept"),
                    "409": _error("A model the reload removes or changes is loading or unloading")})
    if route.path.endswith("/foreign"):
        out["400"] = _error("Not a simulated device, or a bad body")
        out["404"] = _error("Unknown device")
    return out
