"""Exact-path dispatch: a request whose target is exactly a fixed route's path skips aiohttp's
router.

aiohttp resolves every request the general way: it builds the URL object, walks the path's
prefixes through its route index, and makes a new match-info object. Almost every request a
local server gets (health probes, chat, the models list) names a fixed path verbatim, so
:class:`Runner` answers those through one dictionary lookup on the raw request target, and
hands everything else (query strings, percent-escapes, path parameters, unknown paths,
``Expect`` headers) to aiohttp's own ``Application._handle`` unchanged.

The result is the same route aiohttp would pick: a fixed path's own resource always wins over
any pattern, as aiohttp walks from the full path to shorter prefixes. Only applications without
middlewares, sub-applications or domain routes take this path (ours have none: the gate wraps
each handler instead, see ``middleware.guarded``); any other keeps the router for everything.

It sets ``request._match_info`` as ``Application._handle`` does; there is no public setter.
The aiohttp minor version is pinned for that reason (pyproject.toml), and the test suite's
servers all run through this runner.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import hdrs, web
from aiohttp.web_server import Server

RequestHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def _fixed_routes(app: web.Application) -> dict[str, dict[str, web.UrlMappingMatchInfo]]:
    """Path → method → the (frozen, shared) match info of every fixed-path route of ``app``.

    A shared match info is safe: a fixed path has no parameters to differ between requests,
    and a frozen one refuses changes to its app stack."""
    table: dict[str, dict[str, web.UrlMappingMatchInfo]] = {}
    for resource in app.router.resources():
        if not isinstance(resource, web.PlainResource):
            continue
        for route in resource:
            info = web.UrlMappingMatchInfo({}, route)
            info.add_app(app)
            info.freeze()
            table.setdefault(resource.canonical, {}).setdefault(route.method, info)
    return table


def exact_dispatch(app: web.Application, routed: RequestHandler) -> RequestHandler:
    """``routed`` (aiohttp's handler for ``app``) with fixed paths looked up directly."""
    if app.middlewares or app._subapps or app.router._matched_sub_app_resources:
        return routed  # those need aiohttp's own resolution for every request
    table = _fixed_routes(app)

    async def dispatch(request: web.BaseRequest) -> web.StreamResponse:
        methods = table.get(request.raw_path)
        if methods is not None and hdrs.EXPECT not in request.headers:
            info = methods.get(request.method)  # an empty mapping: falsy, so compare to None
            if info is None:
                info = methods.get(hdrs.METH_ANY)
            if info is not None:
                request._match_info = info  # type: ignore[attr-defined]
                return await info.handler(request)  # type: ignore[arg-type]
        return await routed(request)  # the router: also the right 405 for a known path

    return dispatch


class Runner(web.AppRunner):
    """``web.AppRunner`` whose server dispatches fixed paths directly (module notes)."""

    async def _make_server(self) -> Server:
        server = await super()._make_server()  # starts and freezes the app
        server.request_handler = exact_dispatch(self.app, server.request_handler)
        return server
