"""The database service's wire: records ↔ protobuf messages, errors ↔ gRPC status.

Both ends of ``DatabaseService`` (``grpc_service`` serving, ``client.RemoteMemory`` calling)
convert through this module, so a record or an error has one encoding.

Records: ``protos/database.proto`` names its fields like the pydantic records and like
``Memory``'s parameters, so two generic functions convert every message: :func:`build` (values
→ message; ``None`` leaves a field unset, a value for ``x`` goes to ``x_json`` as JSON text
where the message has that field instead) and :func:`values` (message → values, unset
``optional`` fields left out so ``Memory``'s defaults apply). A field name that the message
lacks is a ``TypeError``, as an unexpected keyword argument is for ``Memory``.

Errors: the server ends a failed call with the status code of the exception's class and names
the class, its ``code`` and ``param`` in trailing metadata; the client raises the same class
with the same code. Failures that never reached the servicer (the channel is down, the token
was refused, a deadline passed) have no such metadata and map by status code alone.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, TypeVar

import grpc
from pydantic import BaseModel

from ml_service.proto import database_pb2 as pb
from tabagent import errors
from tabagent.errors import (
    BadRequest,
    Conflict,
    DiskError,
    Forbidden,
    MethodNotAllowed,
    NotFound,
    NotImplementedYet,
    PayloadTooLarge,
    SchemaTooNew,
    ServiceUnavailable,
    StorageError,
    TabAgentError,
    Timeout,
    TooManyRequests,
    Unauthorized,
    ValidationFailed,
)


class ProtoMessage(Protocol):
    """What this module uses of a generated message (protobuf ships no type stubs)."""

    DESCRIPTOR: Any

    def HasField(self, field_name: str) -> bool: ...


M = TypeVar("M", bound=ProtoMessage)
R = TypeVar("R", bound=BaseModel)

ERROR_TYPE = "tabagent-error-type"
ERROR_CODE = "tabagent-error-code"
ERROR_PARAM = "tabagent-error-param"
ERROR_RETRY_AFTER = "tabagent-error-retry-after"
_JSON = "_json"
_STRING_LIST = "tabagent.database.v1.StringList"
# google.protobuf.descriptor.FieldDescriptor's constants
_REPEATED = 3
_STRING = 9

# -- records ---------------------------------------------------------------------------------


def build(message_type: type[M], items: Mapping[str, Any]) -> M:
    """A message of ``message_type`` from record fields or keyword arguments."""
    return message_type(**_fields(message_type.DESCRIPTOR, items))


def to_proto(record: BaseModel, message_type: type[M]) -> M:
    return build(message_type, record.model_dump())


def from_proto(message: ProtoMessage, model: type[R]) -> R:
    return model.model_validate(values(message))


def _fields(descriptor: Any, items: Mapping[str, Any]) -> dict[str, Any]:
    by_name = descriptor.fields_by_name
    out: dict[str, Any] = {}
    for name, value in items.items():
        if value is None:
            continue
        if name + _JSON in by_name:
            out[name + _JSON] = json.dumps(value)
            continue
        field = by_name.get(name)
        if field is None:
            raise TypeError(f"{descriptor.name} has no field {name!r}")
        out[name] = _field(field, value)
    return out


def _field(field: Any, value: Any) -> Any:
    sub = field.message_type
    if sub is None:
        return list(value) if field.label == _REPEATED else value
    if sub.GetOptions().map_entry:
        return dict(value)
    cls: type[ProtoMessage] = getattr(pb, sub.name)  # every message of the file is top-level
    if sub.full_name == _STRING_LIST:
        return cls(values=list(value))  # type: ignore[call-arg]
    if field.label == _REPEATED:
        return [_message(cls, item) for item in value]
    return _message(cls, value)


def _message(cls: type[ProtoMessage], value: Any) -> ProtoMessage:
    if isinstance(value, BaseModel):
        value = value.model_dump()
    return cls(**_fields(cls.DESCRIPTOR, value))


def values(message: ProtoMessage) -> dict[str, Any]:
    """The fields of ``message`` that carry a value, JSON fields decoded, lists as lists."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        name, value = field.name, getattr(message, field.name)
        repeated = field.label == _REPEATED
        sub = field.message_type
        if name.endswith(_JSON) and field.type == _STRING:
            if value:  # "" is unset: json.dumps never writes an empty string
                out[name.removesuffix(_JSON)] = _loads(name, value)
        elif sub is not None and sub.GetOptions().map_entry:
            out[name] = dict(value)
        elif repeated:
            out[name] = [values(v) for v in value] if sub is not None else list(value)
        elif sub is not None:
            if message.HasField(name):
                out[name] = list(value.values) if sub.full_name == _STRING_LIST else values(value)
        elif not field.has_presence or message.HasField(name):
            out[name] = value
    return out


def _loads(name: str, text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise BadRequest(f"{name} is not valid JSON: {exc}", param=name) from None


def dumps(value: Any) -> str:
    """JSON text of a free-form value; NumPy scalars (vector counts) become plain numbers."""
    return json.dumps(value, default=_plain)


def _plain(value: Any) -> Any:
    item = getattr(value, "item", None)
    if callable(item):
        return item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


# -- errors ----------------------------------------------------------------------------------

# Subclasses before their bases: the first class an error is an instance of decides.
_STATUS: dict[type[TabAgentError], grpc.StatusCode] = {
    NotFound: grpc.StatusCode.NOT_FOUND,
    BadRequest: grpc.StatusCode.INVALID_ARGUMENT,
    ValidationFailed: grpc.StatusCode.INVALID_ARGUMENT,
    SchemaTooNew: grpc.StatusCode.FAILED_PRECONDITION,
    Conflict: grpc.StatusCode.ALREADY_EXISTS,
    PayloadTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    TooManyRequests: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DiskError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unauthorized: grpc.StatusCode.UNAUTHENTICATED,
    Forbidden: grpc.StatusCode.PERMISSION_DENIED,
    MethodNotAllowed: grpc.StatusCode.UNIMPLEMENTED,
    NotImplementedYet: grpc.StatusCode.UNIMPLEMENTED,
    ServiceUnavailable: grpc.StatusCode.UNAVAILABLE,
    Timeout: grpc.StatusCode.DEADLINE_EXCEEDED,
    StorageError: grpc.StatusCode.INTERNAL,
    TabAgentError: grpc.StatusCode.INTERNAL,
}

# Every class of the tree by name: the client raises what the server raised.
_CLASSES: dict[str, type[TabAgentError]] = {
    name: cls
    for name, cls in vars(errors).items()
    if isinstance(cls, type) and issubclass(cls, TabAgentError)
}


def status_of(exc: TabAgentError) -> grpc.StatusCode:
    """The status of the first class in ``_STATUS`` (subclasses listed before their bases)."""
    return next(s for cls, s in _STATUS.items() if isinstance(exc, cls))


def error_metadata(exc: TabAgentError) -> tuple[tuple[str, str], ...]:
    """Trailing metadata naming the error; values must be ASCII, so odd params are dropped."""
    name = type(exc).__name__ if type(exc).__name__ in _CLASSES else "TabAgentError"
    items = [(ERROR_TYPE, name), (ERROR_CODE, exc.code)]
    if exc.param is not None:
        items.append((ERROR_PARAM, exc.param))
    if exc.retry_after is not None:
        items.append((ERROR_RETRY_AFTER, repr(float(exc.retry_after))))
    return tuple((k, v) for k, v in items if v.isascii() and v.isprintable())


def error_from_status(
    status: grpc.StatusCode,
    details: str,
    trailing: Sequence[tuple[str, str | bytes]],
    what: str,
) -> TabAgentError:
    """The exception a failed call stands for (``what`` names the call in messages)."""
    meta = {k: v.decode() if isinstance(v, bytes) else v for k, v in trailing}
    cls = _CLASSES.get(meta.get(ERROR_TYPE, ""))
    if cls is not None:
        retry = meta.get(ERROR_RETRY_AFTER)
        return cls(
            details,
            code=meta.get(ERROR_CODE),
            param=meta.get(ERROR_PARAM),
            retry_after=float(retry) if retry else None,
        )
    if status == grpc.StatusCode.UNAUTHENTICATED:
        return StorageError(
            "the database server refused this client's token", code="database_token_rejected"
        )
    if status in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return ServiceUnavailable(
            f"the database server is unavailable ({what}): {details}",
            code="database_unavailable",
            retry_after=1,
        )
    if status == grpc.StatusCode.DEADLINE_EXCEEDED:
        return Timeout(f"{what} took too long", code="database_timeout")
    if status == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return PayloadTooLarge(details)
    if status == grpc.StatusCode.UNIMPLEMENTED:
        return NotImplementedYet(f"the database server does not know {what}")
    if status == grpc.StatusCode.NOT_FOUND:
        return NotFound(details)
    if status == grpc.StatusCode.INVALID_ARGUMENT:
        return BadRequest(details)
    return StorageError(f"{what} failed in the database server: {details}")
