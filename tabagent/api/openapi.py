"""OpenAPI 3.1 document generated from the operation registry's pydantic models.

Never written by hand: a new operation appears here as soon as it is registered.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from tabagent import __version__
from tabagent.ops.registry import Operation, Registry

_REF = "#/components/schemas/{model}"
_PATH_PARAM = re.compile(r"{(\w+)(?::[^}]*)?}")

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": "string"},
            },
        }
    },
}


def _error_response(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": _REF.format(model="Error")}}},
    }


def _members(model: Any) -> list[type[BaseModel]]:
    """A response model, or the members of a union of event models."""
    args = typing.get_args(model)
    return list(args) if args else [model]


def _response_schema(
    model: Any, refs: Mapping[tuple[Any, JsonSchemaMode], dict[str, Any]]
) -> dict[str, Any]:
    members = _members(model)
    if len(members) == 1:
        return refs[(members[0], "serialization")]
    return {"oneOf": [refs[(m, "serialization")] for m in members]}


def _resolve(ref: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    name = str(ref.get("$ref", "")).rsplit("/", 1)[-1]
    schema: dict[str, Any] = defs.get(name, {})
    return schema


def _operation_doc(
    op: Operation, refs: Mapping[tuple[Any, JsonSchemaMode], dict[str, Any]], defs: dict[str, Any]
) -> dict[str, Any]:
    assert op.http is not None
    path_params = set(_PATH_PARAM.findall(op.http.path))
    doc: dict[str, Any] = {
        "operationId": op.name,
        "summary": op.summary,
        "tags": list(op.tags),
    }
    if op.description:
        doc["description"] = op.description
    if op.http.method in ("POST", "PUT", "PATCH"):
        doc["requestBody"] = {
            "required": bool(op.request_model.model_fields),
            "content": {"application/json": {"schema": refs[(op.request_model, "validation")]}},
        }
        fields_in_query: set[str] = set()
    else:
        fields_in_query = set(op.request_model.model_fields) - path_params
    request_schema = _resolve(refs[(op.request_model, "validation")], defs)
    props = request_schema.get("properties", {})
    required = set(request_schema.get("required", []))
    parameters = []
    for name in sorted(path_params):
        parameters.append(
            {
                "name": name,
                "in": "path",
                "required": True,
                "schema": props.get(name, {"type": "string"}),
            }
        )
    for name in sorted(fields_in_query):
        parameters.append(
            {
                "name": name,
                "in": "query",
                "required": name in required,
                "schema": props.get(name, {}),
            }
        )
    if parameters:
        doc["parameters"] = parameters
    media = "text/event-stream" if op.streaming else "application/json"
    ok: dict[str, Any] = {
        "description": "Server-Sent Events; each data line is one event"
        if op.streaming
        else "Success",
        "content": {media: {"schema": _response_schema(op.response_model, refs)}},
    }
    responses: dict[str, Any] = {str(op.http.status): ok}
    if op.request_model.model_fields or path_params:
        responses["422"] = _error_response("Invalid parameters")
    if not op.public:
        responses["401"] = _error_response("Missing or wrong API key (when one is configured)")
    responses["default"] = _error_response("Error")
    doc["responses"] = responses
    doc["security"] = [] if op.public else [{"bearerAuth": []}, {}]
    return doc


def build_openapi(registry: Registry) -> dict[str, Any]:
    http_ops = [op for op in registry if op.http is not None]
    wanted: list[tuple[type[BaseModel], JsonSchemaMode]] = []
    for op in http_ops:
        keys = [(op.request_model, "validation")]
        keys += [(model, "serialization") for model in _members(op.response_model)]
        for key in keys:
            if key not in wanted:
                wanted.append(key)  # type: ignore[arg-type]
    refs, top = models_json_schema(wanted, ref_template=_REF)
    defs: dict[str, Any] = dict(top.get("$defs", {}))
    paths: dict[str, dict[str, Any]] = {}
    for op in http_ops:
        assert op.http is not None
        path = _PATH_PARAM.sub(r"{\1}", op.http.path)
        paths.setdefault(path, {})[op.http.method.lower()] = _operation_doc(op, refs, defs)
    defs["Error"] = ERROR_SCHEMA
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "TabAgent API",
            "version": __version__,
            "description": "Local AI server: models, memory, browser integration and vision. "
            "The same operations are reachable over native messaging and WebRTC data channels "
            "by their operationId.",
        },
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {
            "schemas": defs,
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
        },
    }
