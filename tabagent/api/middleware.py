"""HTTP middleware: request ids, the single error→JSON mapping, metrics, and local-server security.

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

from aiohttp import web
from aiohttp.typedefs import Handler

from tabagent.api.keys import CORS_ORIGIN, REQUEST_ID, STATE
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

REQUEST_ID_HEADER = "X-Request-Id"
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
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


def _preflight(request: web.Request, origin: str) -> web.Response:
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


def _check_access(
    policy: SecurityPolicy, request: web.Request, public: bool
) -> web.Response | None:
    """Host, Origin and API key checks; a CORS preflight answer, or None to go on."""
    host_header = request.headers.get("Host", "")
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
    origin = request.headers.get("Origin")
    if origin is not None:
        if policy.origin_allowed(origin):
            request[CORS_ORIGIN] = origin
            if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
                return _preflight(request, origin)
        elif origin not in (f"http://{host_header}", f"https://{host_header}"):
            raise Forbidden(
                f"Origin {origin!r} is not allowed; add it with --allowed-origins "
                "or --extension-ids",
                code="origin_not_allowed",
            )
    key_needed = policy.requires_key and not public
    if key_needed and not policy.key_ok(request.headers.get("Authorization")):
        raise Unauthorized(
            "missing or wrong API key: send 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return None


class Gate:
    """What every request of one application passes: its policy, request ids and metrics."""

    def __init__(self, policy: SecurityPolicy, metrics: Metrics) -> None:
        self.policy = policy
        self.observe = metrics.observe_http
        self._next_id = itertools.count(1)
        self._prefix = secrets.token_hex(4)  # distinct ids across restarts; a counter within one

    def request_id(self, incoming: str | None) -> str:
        if incoming and _REQUEST_ID_RE.fullmatch(incoming):
            return incoming
        return f"{self._prefix}{next(self._next_id):08x}"


GATE = web.AppKey("gate", Gate)


def guarded(handler: Handler, *, route: str | None = None) -> Handler:
    """``handler`` behind the gate: request id, access checks, every error as JSON, the common
    headers, metrics. Every route's handler is wrapped this way when it is added.

    A wrapper per handler rather than an aiohttp middleware: middlewares add two layers to
    every request (aiohttp puts its own ``_fix_request_current_app`` beside ours), which cost
    about as much as everything the gate itself does. ``route`` names the metrics label when
    the route's path template is not a useful one (the catch-all).
    """
    public = getattr(handler, "tabagent_public", False)

    async def guard(request: web.Request) -> web.StreamResponse:
        start = time.perf_counter()
        gate = request.app[GATE]
        request_id = gate.request_id(request.headers.get(REQUEST_ID_HEADER))
        request[REQUEST_ID] = request_id
        token = request_id_var.set(request_id)
        try:
            try:
                preflight = _check_access(gate.policy, request, public)
                response = preflight if preflight is not None else await handler(request)
            except TabAgentError as exc:
                response = error_response(exc)
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
                response.headers.update(common_headers(request))
            elapsed = time.perf_counter() - start
            label = route or request.match_info.route.resource.canonical  # type: ignore[union-attr]
            gate.observe(label, request.method, response.status, elapsed)
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


def install_gate(app: web.Application, gate: Gate) -> None:
    """Last step of building ``app``: answer every unmatched request as JSON, and check that
    every route is guarded (an unguarded route would skip the Host and API-key checks)."""
    app[GATE] = gate
    app.router.add_route("*", "/{path:.*}", guarded(_unmatched, route="unmatched"))
    for r in app.router.routes():
        if not getattr(r.handler, "tabagent_guarded", False):
            raise RuntimeError(f"route {r.method} {r.resource} is not wrapped with guarded()")


def common_headers(request: web.Request) -> dict[str, str]:
    """Headers every response carries: its request id, and CORS for an allowed origin."""
    headers = {REQUEST_ID_HEADER: request[REQUEST_ID], "X-Content-Type-Options": "nosniff"}
    origin = request.get(CORS_ORIGIN)
    if origin is not None:
        headers["Access-Control-Allow-Origin"] = origin
        headers["Access-Control-Expose-Headers"] = _CORS_EXPOSE_HEADERS
        headers["Vary"] = "Origin"
    return headers
