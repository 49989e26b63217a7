"""The raw baseline: a bare aiohttp app answering the same two routes, no middleware at all.

``python -m bench.bare_server --port N [--health-document FILE]``. It does the least work those
routes can do (a fixed small JSON for health; read and parse the JSON body for the POST), with
the access log off as in TabAgent, so the gap to TabAgent is exactly what our middleware,
routing and models cost. With ``--health-document`` it also answers ``GET /v1/health/same``
with that document (TabAgent's own health answer), serialised per request as any aiohttp app
would: the like-for-like baseline, where the only difference left is TabAgent's stack.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from aiohttp import web


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def set_log_level(request: web.Request) -> web.Response:
    body = json.loads(await request.read())
    return web.json_response({"level": body["level"], "previous": "WARNING"})


def build_app(health_document: dict[str, object] | None = None) -> web.Application:
    app = web.Application()
    app.router.add_get("/v1/health", health)
    app.router.add_post("/v1/system/log-level", set_log_level)
    if health_document is not None:

        async def same_health(request: web.Request) -> web.Response:
            return web.json_response(health_document)

        app.router.add_get("/v1/health/same", same_health)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bare_server", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--health-document", type=Path, help="JSON for GET /v1/health/same")
    args = parser.parse_args(argv)
    document = json.loads(args.health_document.read_text()) if args.health_document else None
    # run_app turns SIGTERM into a graceful exit; no access log and no banner, like TabAgent.
    web.run_app(build_app(document), host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
