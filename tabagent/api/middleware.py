"""The gate every HTTP route passes: request ids, the single error→JSON mapping, metrics, and
local-server security. Each route's handler is wrapped when the route is added (``add_route``),
and ``close_gate`` refuses an application with a route added any other way.

A local server is reachable by every web page the user opens, so before any handler runs:

1. **Host allow-list** (DNS-rebinding defence): the Host header must name loopback
   (``localhost``, ``127.0.0.1``, ``[::1]``, any port), the bound address, or a configured name.
   A missing or empty Host is refused.
2. **Origin check**: a request that carries an ``Origin`` must come from an allowed origin
   (configured, or ``chrome-extension://<configured id>``) or from this server's own pages.
   Others are refused with 403 and get no CORS headers, so a foreign page can neither read
   answers nor trigger side effects with "simple" requests.
3. **CORS preflight** for allowed origins, including ``Access-Control-Allow-Private-Network``.
4. **API key** (``Authorization: Bearer …``, constant-time compare) when one is configured;
   public routes (health, docs, the web UI) stay open.
"""

from __future__ import annotations

import hmac
import itertools
import logging
import re
import secrets
import time
from collections.abc import MutableMapping

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler
from multidict import istr

from tabagent.api.keys import CORS_ORIGIN, STATE
from tabagent.errors import (
    Forbidden,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    TabAgentError,
    Unauthorized,
)
from tabagent.logs import request_id_var
from tabagent.metrics import Metrics

log = logging.getLogger(__name__)

# istr: header names whose case-folded form is made once, not on every response
REQUEST_ID_HEADER = istr("X-Request-Id")
_NOSNIFF_HEADER = istr("X-Content-Type-Options")
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_PATH_VARIABLE = re.compile(r"\{(\w+):[^}]*\}")
_LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
_WILDCARD_BINDS = frozenset({"0.0.0.0", "::", ""})
_CORS_ALLOW_HEADERS = "Authorization, Content-Type, X-Request-Id, X-Conversation-Id"
_CORS_EXPOSE_HEADERS = "X-Request-Id, Retry-After"
_CORS_METHODS = "GET, POST, PUT, PATCH, DELETE, OPTIONS"
_PREFLIGHT_MAX_AGE = "600"


def mark_public(handler: Handler) -> Handler:
    """Routes whose handler is marked public skip the API key check."""
    handler.tabagent_public = True  # type: ignore[attr-defined]
    return handler


def error_response(exc: TabAgentError) -> web.Response:
    headers = dict(exc.headers)
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    return web.json_response({"error": exc.to_dict()}, status=exc.status, headers=headers)


def _from_http_exception(request: web.Request, exc: web.HTTPException) -> TabAgentError:
    if isinstance(exc, web.HTTPNotFound):
        return NotFound(f"no route for {request.method} {request.path}")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        return MethodNotAllowed(
            f"{request.method} is not allowed on {request.path} (allowed: {allowed})",
            headers={"Allow": allowed},
        )
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        limit = request.app[STATE].settings.max_body_bytes
        return PayloadTooLarge(f"request body is larger than the limit of {limit} bytes")
    err = TabAgentError(exc.reason or "error", code=f"http_{exc.status}")
    err.status = exc.status  # type: ignore[misc]
    return err


def _host_name(header: str) -> str:
    """``[::1]:3000`` → ``::1``; ``LocalHost.:80`` → ``localhost``."""
    header = header.strip().lower()
    if header.startswith("["):
        end = header.find("]")
        return header[1:end] if end > 0 else ""
    name, sep, port = header.rpartition(":")
    if sep and port.isdigit():
        header = name
    return header.rstrip(".")


class SecurityPolicy:
    """The allow-lists of one server, computed once from its settings."""

    def __init__(
        self,
        *,
        bind_host: str,
        allowed_hosts: tuple[str, ...],
        allowed_origins: tuple[str, ...],
        extension_ids: tuple[str, ...],
        api_key: str | None,
    ) -> None:
        self.seen_hosts: set[str] = set()  # Host headers already checked and allowed
        hosts = set(_LOOPBACK_HOSTS) | {h.lower().strip("[]").rstrip(".") for h in allowed_hosts}
        if bind_host not in _WILDCARD_BINDS:
            hosts.add(bind_host.lower().strip("[]"))
        self.allowed_hosts = frozenset(hosts)
        self.allowed_origins = frozenset(o.rstrip("/") for o in allowed_origins) | {
            f"chrome-extension://{ext_id}" for ext_id in extension_ids
        }
        self._api_key = api_key.encode() if api_key else None

    def origin_allowed(self, origin: str) -> bool:
        return origin.rstrip("/") in self.allowed_origins

    def key_ok(self, authorization: str | None) -> bool:
        if self._api_key is None:
            return True
        if not authorization or authorization[:7].lower() != "bearer ":
            return False
        return hmac.compare_digest(authorization[7:].strip().encode(), self._api_key)

    @property
    def requires_key(self) -> bool:
        return self._api_key is not None


def _is_preflight(request: web.Request) -> bool:
    return request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers


def _preflight(request: web.Request, origin: str) -> web.Response:
    """The answer to a CORS preflight from an allowed origin."""
    requested = request.headers.get("Access-Control-Request-Headers")
    return web.Response(
        status=204,
        headers={
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Methods": _CORS_METHODS,
            "Access-Control-Allow-Headers": requested or _CORS_ALLOW_HEADERS,
            "Access-Control-Allow-Private-Network": "true",
            "Access-Control-Max-Age": _PREFLIGHT_MAX_AGE,
            "Vary": "Origin",
        },
    )


def _check_access(policy: SecurityPolicy, request: web.Request, public: bool) -> str | None:
    """Host, Origin and API key checks; the request's Origin when CORS should answer it."""
    host_header = request.headers.get(hdrs.HOST, "")
    if host_header not in policy.seen_hosts:  # parse each distinct Host header once
        host = _host_name(host_header)
        if not host or host not in policy.allowed_hosts:
            raise Forbidden(
                f"Host {host_header!r} is not allowed; add it with --allowed-hosts "
                "(DNS-rebinding protection)",
                code="host_not_allowed",
            )
        if len(policy.seen_hosts) < 64:
            policy.seen_hosts.add(host_header)
    origin = request.headers.get(hdrs.ORIGIN)
    if origin is not None:
        if policy.origin_allowed(origin):
            request[CORS_ORIGIN] = origin  # for streams, which send their headers themselves
            if _is_preflight(request):
                return origin  # a preflight carries no credentials: answered, never run
        elif origin not in (f"http://{host_header}", f"https://{host_header}"):
            raise Forbidden(
                f"Origin {origin!r} is not allowed; add it with --allowed-origins "
                "or --extension-ids",
                code="origin_not_allowed",
            )
        else:
            origin = None  # this server's own page: same origin, no CORS
    key_needed = policy.requires_key and not public
    if key_needed and not policy.key_ok(request.headers.get("Authorization")):
        raise Unauthorized(
            "missing or wrong API key: send 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return origin


class Gate:
    """What every request of one application passes: its policy, request ids and metrics."""

    def __init__(self, policy: SecurityPolicy, metrics: Metrics) -> None:
        self.policy = policy
        self.observe = metrics.observe_http
        self.next_id = itertools.count(1)
        self.id_prefix = secrets.token_hex(4)  # distinct ids across restarts; a counter within


GATE = web.AppKey("gate", Gate)


def guarded(handler: Handler, gate: Gate, route: str) -> Handler:
    """``handler`` behind the gate: request id, access checks, every error as JSON, the common
    headers, metrics labelled ``route``. Every route's handler is wrapped this way when added.

    A wrapper per handler rather than an aiohttp middleware: middlewares add two layers to
    every request (aiohttp puts its own ``_fix_request_current_app`` beside ours), which cost
    about as much as everything the gate itself does. On this path every Python-level call
    shows in the benchmark, so what can be settled when the route is added is settled here.
    """
    policy = gate.policy
    public = getattr(handler, "tabagent_public", False)
    needs_key = policy.requires_key and not public
    seen_hosts = policy.seen_hosts
    observe = gate.observe

    async def guard(request: web.Request) -> web.StreamResponse:
        start = time.perf_counter()
        headers = request.headers
        request_id = headers.get(REQUEST_ID_HEADER)
        if request_id is None or not _REQUEST_ID_RE.fullmatch(request_id):
            request_id = f"{gate.id_prefix}{next(gate.next_id):08x}"
        token = request_id_var.set(request_id)  # log lines, handlers and streams read it here
        origin = None
        try:
            try:
                if needs_key or hdrs.ORIGIN in headers or headers.get(hdrs.HOST) not in seen_hosts:
                    origin = _check_access(policy, request, public)
                response: web.StreamResponse
                if origin is not None and _is_preflight(request):
                    response = _preflight(request, origin)
                else:
                    response = await handler(request)
            except TabAgentError as exc:
                response = error_response(exc)
                origin = request.get(CORS_ORIGIN)  # a refused key: the page may read why
            except web.HTTPException as exc:
                if exc.status < 400:
                    raise
                response = error_response(_from_http_exception(request, exc))
            except Exception:
                log.exception("unhandled error in %s %s", request.method, request.path)
                response = error_response(
                    TabAgentError(f"internal server error (request id {request_id})")
                )
            if not response.prepared:  # streams set these before they start
                set_common_headers(response.headers, request_id, origin)
            elapsed = time.perf_counter() - start
            observe(route, request.method, response.status, elapsed)
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "%s %s -> %d in %.1f ms",
                    request.method, request.path, response.status, elapsed * 1000,
                )  # fmt: skip
            return response
        finally:
            request_id_var.reset(token)

    guard.__name__ = getattr(handler, "__name__", "handler")
    guard.__doc__ = handler.__doc__
    guard.tabagent_guarded = True  # type: ignore[attr-defined]
    return guard


def add_route(
    app: web.Application, method: str, path: str, handler: Handler, *, name: str | None = None
) -> None:
    """Add ``handler`` at ``path`` behind the gate; a GET route answers HEAD too. Every route
    is added this way (``close_gate`` refuses an application with a route that is not)."""
    route = _PATH_VARIABLE.sub(r"{\1}", path)  # metrics label: "/{tail:.*}" -> "/{tail}"
    guard = guarded(handler, app[GATE], route)
    if method == "GET":
        app.router.add_get(path, guard, name=name)
    else:
        app.router.add_route(method, path, guard, name=name)


async def _unmatched(request: web.Request) -> web.StreamResponse:
    """No route matched: 405 with ``Allow`` when the path exists for other methods, else 404."""
    allowed: set[str] = set()
    this = request.match_info.route.resource
    for resource in request.app.router.resources():
        if resource is not this:
            allowed |= (await resource.resolve(request))[1]
    if allowed:
        methods = ", ".join(sorted(allowed))
        raise MethodNotAllowed(
            f"{request.method} is not allowed on {request.path} (allowed: {methods})",
            headers={"Allow": methods},
        )
    raise NotFound(f"no route for {request.method} {request.path}")


def close_gate(app: web.Application) -> None:
    """Last step of building ``app``: answer every unmatched request as JSON, and check that
    every route is guarded (an unguarded route would skip the Host and API-key checks)."""
    app.router.add_route("*", "/{path:.*}", guarded(_unmatched, app[GATE], "unmatched"))
    for r in app.router.routes():
        if not getattr(r.handler, "tabagent_guarded", False):
            raise RuntimeError(f"route {r.method} {r.resource} is not wrapped with guarded()")


def set_common_headers(
    headers: MutableMapping[str, str], request_id: str, origin: str | None
) -> None:
    """Set the headers every response carries: its request id, and CORS for an allowed origin
    (the gate sets them on every response; streams, which send headers first, ask for them)."""
    headers[REQUEST_ID_HEADER] = request_id
    headers[_NOSNIFF_HEADER] = "nosniff"
    if origin is not None:
        headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = origin
        headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = _CORS_EXPOSE_HEADERS
        headers[hdrs.VARY] = "Origin"


def common_headers(request_id: str, origin: str | None) -> dict[str, str]:
    """The headers :func:`set_common_headers` sets, for a response made elsewhere."""
    headers: dict[str, str] = {}
    set_common_headers(headers, request_id, origin)
    return headers
