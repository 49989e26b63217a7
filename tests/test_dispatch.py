"""Exact-path dispatch (tabagent/api/dispatch.py): fixed paths skip aiohttp's router and get
the same route it would pick; everything else goes through the router unchanged."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from aiohttp.typedefs import Handler
from yarl import URL

from tests.helpers import Server

Client = TestClient[web.Request, web.Application]
Seen = list[tuple[str, web.UrlMappingMatchInfo]]  # kept, so no id is reused


def _app(seen: Seen, *, middleware: bool = False) -> web.Application:
    """Handlers that record which of them ran and which match-info object they were given."""

    def handler(name: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            seen.append((name, request.match_info))
            return web.json_response({"handler": name, **request.match_info, **request.query})

        return handle

    @web.middleware
    async def tag(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await handler(request)
        response.headers["X-Middleware"] = "ran"
        return response

    app = web.Application(middlewares=[tag] if middleware else [])
    app.router.add_get("/a", handler("get a"))
    app.router.add_post("/a", handler("post a"))
    app.router.add_route("*", "/any", handler("any"))
    app.router.add_get("/{x}", handler("pattern"))
    return app


async def _client(aiohttp_client: Callable[..., Awaitable[Client]], app: web.Application) -> Client:
    return await aiohttp_client(Server(app))


async def test_a_fixed_path_skips_the_router_and_reaches_the_route_it_would_pick(
    aiohttp_client: Callable[..., Awaitable[Client]],
) -> None:
    seen: Seen = []
    client = await _client(aiohttp_client, _app(seen))
    for _ in range(2):
        response = await client.get("/a")
        assert (await response.json()) == {"handler": "get a"}
    # the router makes a new match info per request; the direct lookup hands out the route's own
    assert seen[0][1] is seen[1][1]
    assert (await (await client.post("/a")).json()) == {"handler": "post a"}
    assert (await client.head("/a")).status == 200  # a GET route answers HEAD, as aiohttp's do
    assert (await (await client.delete("/any")).json()) == {"handler": "any"}  # a "*" route


async def test_what_is_not_a_verbatim_fixed_path_goes_through_the_router(
    aiohttp_client: Callable[..., Awaitable[Client]],
) -> None:
    seen: Seen = []
    client = await _client(aiohttp_client, _app(seen))
    await client.get("/a")
    direct = seen.pop()[1]  # the match info the direct lookup hands out for GET /a
    assert (await (await client.get("/a?q=1")).json()) == {"handler": "get a", "q": "1"}
    escaped = URL("/%61", encoded=True)  # sent as is: the router decodes it to /a
    assert (await (await client.get(escaped)).json()) == {"handler": "get a"}
    assert (await (await client.get("/b")).json()) == {"handler": "pattern", "x": "b"}
    assert [name for name, _ in seen] == ["get a", "get a", "pattern"]
    assert all(info is not direct for _, info in seen)  # each made by the router
    refused = await client.put("/a")  # a known path, another method: the router's 405
    assert refused.status == 405
    assert set(refused.headers["Allow"].split(",")) >= {"GET", "POST"}
    expect = await client.post("/a", data=b"{}", headers={"Expect": "100-continue"})
    assert expect.status == 200
    assert (await expect.json()) == {"handler": "post a"}


def _tangled_app() -> web.Application:
    """Fixed paths that are not simply their own resource's: the router's order decides."""

    def handler(name: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            return web.json_response({"handler": name, **request.match_info})

        return handle

    app = web.Application()
    app.router.add_route("*", "/x", handler("any x"))  # first: it answers POST /x too
    app.router.add_get("/y", handler("y"))
    app.router.add_post("/x", handler("post x"))  # a second resource at /x, never reached
    app.router.add_get("/{tail:.*}", handler("catch-all"))  # before "/": it answers GET /
    app.router.add_get("/", handler("root"))
    app.router.add_get("/a/{x:.*}", handler("a pattern"))  # before "/a/": it answers it
    app.router.add_get("/a/", handler("a slash"))
    return app


async def test_a_fixed_path_gets_the_route_the_router_gives_even_when_another_shadows_it(
    aiohttp_client: Callable[..., Awaitable[Client]],
) -> None:
    ours = await aiohttp_client(Server(_tangled_app()))
    theirs = await aiohttp_client(TestServer(_tangled_app()))  # aiohttp's own runner
    for method, path in [
        ("POST", "/x"), ("GET", "/x"), ("PUT", "/x"), ("GET", "/"), ("GET", "/a/"),
        ("GET", "/y"), ("POST", "/y"), ("OPTIONS", "/y"),
    ]:  # fmt: skip
        mine, reference = [await c.request(method, path) for c in (ours, theirs)]
        assert mine.status == reference.status, (method, path)
        assert (await mine.read()) == (await reference.read()), (method, path)
    assert (await (await ours.post("/x")).json()) == {"handler": "any x"}
    assert (await (await ours.get("/")).json()) == {"handler": "catch-all", "tail": ""}


async def test_the_shared_match_info_of_a_fixed_path_is_read_only(
    aiohttp_client: Callable[..., Awaitable[Client]],
) -> None:
    async def meddle(request: web.Request) -> web.Response:
        try:
            request.match_info["n"] = "1"
        except TypeError as exc:
            return web.json_response({"refused": str(exc)})
        return web.json_response(dict(request.match_info))

    app = web.Application()
    app.router.add_get("/m", meddle)
    client = await aiohttp_client(Server(app))
    for _ in range(2):
        assert "read-only" in (await (await client.get("/m")).json())["refused"]


async def test_an_application_with_middlewares_keeps_the_router_for_everything(
    aiohttp_client: Callable[..., Awaitable[Client]],
) -> None:
    seen: Seen = []
    client = await _client(aiohttp_client, _app(seen, middleware=True))
    for _ in range(2):
        response = await client.get("/a")
        assert response.headers["X-Middleware"] == "ran"
    assert seen[0][1] is not seen[1][1]


async def test_a_tabagent_route_answers_the_same_both_ways(
    client: Client,
) -> None:
    direct = await client.get("/v1/system")
    routed = await client.get(URL("/v1/%73ystem", encoded=True))  # through the router
    assert direct.status == routed.status == 200
    assert (await direct.json()) == (await routed.json())
    assert direct.headers["X-Request-Id"] != routed.headers["X-Request-Id"]  # both gated
