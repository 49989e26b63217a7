"""Exact-path dispatch: a request whose target is exactly a fixed route's path skips aiohttp's
router, and gets the answer the router gave for that path when the server started.

aiohttp resolves every request the general way: it builds the URL object, walks the path's
prefixes through its route index, and makes a new match-info object. Almost every request a
local server gets (health probes, chat, the models list) names a fixed path verbatim. So when
the server starts, :class:`Runner` asks the router once for each fixed path and each method
the application serves, and keeps every answer that is a route. A request whose raw target is
one of those paths then costs one dictionary lookup. Everything else goes to aiohttp's own
``Application._handle`` unchanged: query strings, percent-escapes, paths with parameters,
unknown paths, methods the path does not serve (the router's 405), and ``Expect`` headers.

The kept answers are the router's own, so the route is the same by construction: the
router's choice depends only on the method and the path. That holds for applications without
middlewares, sub-applications or domain routes (ours have none: the gate wraps each handler
instead, see ``middleware.guarded``); any other application keeps the router for everything.

A kept match info is shared by every request on its path, so it refuses changes. Handing it
to the request sets ``request._match_info``, as ``Application._handle`` does; there is no
public setter. The aiohttp minor version is pinned for this (pyproject.toml names the private
parts used), and the test suite's app servers (``tests.helpers.Server``) run through this
runner.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from aiohttp import hdrs, web
from aiohttp.web_server import Server
from yarl import URL

RequestHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
Table = dict[str, dict[str, web.UrlMappingMatchInfo]]


class _SharedMatchInfo(web.UrlMappingMatchInfo):
    """A match info kept for a fixed path and handed to every request on it: read-only."""

    __slots__ = ()

    def _refuse(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError("the match info of a fixed path is shared by its requests: read-only")

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = _refuse


@dataclass(frozen=True)
class _Probe:
    """What ``UrlDispatcher.resolve`` reads of a request: its method and path."""

    method: str
    rel_url: URL


async def _fixed_routes(app: web.Application) -> Table:
    """Path → method → the router's match info for that request, for every fixed path."""
    router = app.router
    paths = {r.canonical for r in router.resources() if isinstance(r, web.PlainResource)}
    methods = {route.method for route in router.routes()} - {hdrs.METH_ANY}
    methods |= set(hdrs.METH_ALL)  # a "*" route answers any of them
    table: Table = {}
    for path in sorted(paths):
        if "%" in path:  # the router would see it decoded: not a verbatim target
            continue
        url = URL.build(path=path, encoded=True)
        for method in sorted(methods):
            found = await router.resolve(_Probe(method, url))  # type: ignore[arg-type]
            if found.http_exception is not None:
                continue  # 404/405: the router answers those itself
            info = _SharedMatchInfo(dict(found), found.route)
            info.add_app(app)
            info.freeze()
            table.setdefault(path, {})[method] = info
    return table


def exact_dispatch(routed: RequestHandler, table: Table) -> RequestHandler:
    """``routed`` (aiohttp's handler for the app) with the paths of ``table`` looked up."""

    async def dispatch(request: web.BaseRequest) -> web.StreamResponse:
        methods = table.get(request.raw_path)
        if methods is not None and hdrs.EXPECT not in request.headers:
            info = methods.get(request.method)
            if info is not None:
                request._match_info = info  # type: ignore[attr-defined]
                return await info.handler(request)  # type: ignore[arg-type]
        return await routed(request)

    return dispatch


class Runner(web.AppRunner):
    """``web.AppRunner`` whose server dispatches fixed paths directly (module notes)."""

    async def _make_server(self) -> Server:
        server = await super()._make_server()  # starts and freezes the app
        app = self.app
        if not (app.middlewares or app._subapps or app.router._matched_sub_app_resources):
            table = await _fixed_routes(app)
            server.request_handler = exact_dispatch(server.request_handler, table)
        return server
