"""The operation registry: every capability is defined once and reached by every transport.

An operation is a name (``system.health``), a pydantic request model, a response model (or, for a
streaming operation, an event model), and one async handler ``(ctx, request) -> response`` or an
async generator ``(ctx, request) -> AsyncIterator[event]``. The HTTP adapter mounts a route for
each operation that has an :class:`Http` binding; native messaging and the data channel look
operations up by name. Validation happens here, so every transport rejects the same input with
the same :class:`~tabagent.errors.ValidationFailed`.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from tabagent.errors import NotFound, ValidationFailed

if TYPE_CHECKING:
    from tabagent.state import AppState

HttpMethod = Literal["GET", "POST", "PUT", "PATCH", "DELETE"]


@dataclass(frozen=True, slots=True)
class Http:
    """How an operation appears on HTTP. Path parameters (``{id}``) fill request fields."""

    method: HttpMethod
    path: str
    status: int = 200
    # "default": mounted by tabagent.api.routes; "custom": by tabagent.api.openai, which speaks
    # OpenAI's wire format (chunk objects, `data: [DONE]`) over the same operation.
    adapter: Literal["default", "custom"] = "default"
    # The JSON answer to a call without parameters, made without building the response model:
    # for a route polled far more often than anything changes (health). It must give the same
    # document as the handler (health's uptime to the millisecond); the default adapter uses it.
    render: Callable[[AppState], bytes] | None = None


@dataclass(slots=True)
class OpContext:
    """What a handler knows about the call: who asked, over which transport, and the services."""

    state: AppState
    request_id: str
    transport: str
    peer: str | None = None  # the WebRTC session whose data channel carries the call


class Empty(BaseModel):
    """Request model of operations that take no parameters."""

    model_config = ConfigDict(extra="forbid")


class Done(BaseModel):
    """Last event of a stream whose handler did not send a final event of its own."""

    event_name: typing.ClassVar[str] = "done"


Handler = Callable[[OpContext, Any], Awaitable[BaseModel]]
StreamHandler = Callable[[OpContext, Any], AsyncIterator[BaseModel]]


@dataclass(frozen=True, slots=True)
class Operation:
    name: str
    summary: str
    description: str
    request_model: type[BaseModel]
    response_model: type[BaseModel]
    handler: Callable[..., Any]
    streaming: bool
    http: Http | None = None
    public: bool = False
    tags: tuple[str, ...] = ()

    def parse(self, params: Mapping[str, Any] | None) -> BaseModel:
        """Validate raw parameters into the request model; errors name the offending field."""
        try:
            return self.request_model.model_validate(params or {})
        except ValidationError as exc:
            raise validation_failed(exc) from None

    async def call(self, ctx: OpContext, request: BaseModel) -> BaseModel:
        if self.streaming:
            raise TypeError(f"{self.name} is a streaming operation; use stream()")
        result: BaseModel = await self.handler(ctx, request)
        return result

    def stream(self, ctx: OpContext, request: BaseModel) -> AsyncIterator[BaseModel]:
        if not self.streaming:
            raise TypeError(f"{self.name} is not a streaming operation; use call()")
        events: AsyncIterator[BaseModel] = self.handler(ctx, request)
        return events


def validation_failed(exc: ValidationError) -> ValidationFailed:
    errors = exc.errors(include_url=False)
    first = errors[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    parts = []
    for err in errors[:5]:
        loc = ".".join(str(part) for part in err["loc"])
        parts.append(f"{loc}: {err['msg']}" if loc else err["msg"])
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return ValidationFailed("; ".join(parts) + more, param=param)


def event_name(event: BaseModel) -> str:
    """The envelope ``event`` of a stream item: the model's ``event_name`` or ``delta``."""
    return str(getattr(type(event), "event_name", "delta"))


@dataclass
class OperationGroup:
    """Operations of one area (``system``, ``chat``…), declared with :meth:`operation`."""

    tag: str
    operations: list[Operation] = field(default_factory=list)

    def operation(
        self,
        name: str,
        *,
        http: Http | None = None,
        public: bool = False,
        summary: str | None = None,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Register ``handler`` as operation ``name``; its annotations give the models."""

        def decorate(handler: Callable[..., Any]) -> Callable[..., Any]:
            hints = typing.get_type_hints(handler)
            params = list(inspect.signature(handler).parameters)
            if len(params) != 2:
                raise TypeError(f"{name}: a handler takes (ctx, request)")
            request_model = hints[params[1]]
            returned = hints["return"]
            streaming = inspect.isasyncgenfunction(handler)
            response_model = typing.get_args(returned)[0] if streaming else returned
            doc = inspect.getdoc(handler) or ""
            first_line, _, rest = doc.partition("\n")
            self.operations.append(
                Operation(
                    name=name,
                    summary=summary or first_line or name,
                    description=rest.strip(),
                    request_model=request_model,
                    response_model=response_model,
                    handler=handler,
                    streaming=streaming,
                    http=http,
                    public=public,
                    tags=(self.tag,),
                )
            )
            return handler

        return decorate


class Registry:
    """All operations of one server, by name."""

    def __init__(self, *groups: OperationGroup) -> None:
        self._ops: dict[str, Operation] = {}
        for group in groups:
            self.include(group)

    def include(self, group: OperationGroup) -> None:
        for op in group.operations:
            self.add(op)

    def add(self, op: Operation) -> None:
        if op.name in self._ops:
            raise ValueError(f"operation {op.name} registered twice")
        self._ops[op.name] = op

    def get(self, name: str) -> Operation:
        try:
            return self._ops[name]
        except KeyError:
            raise NotFound(f"unknown method {name!r}", code="unknown_method") from None

    def __contains__(self, name: object) -> bool:
        return name in self._ops

    def __iter__(self) -> Iterator[Operation]:
        return iter(self._ops.values())

    def __len__(self) -> int:
        return len(self._ops)
