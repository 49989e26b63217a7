"""The raw baseline: a bare aiohttp app answering the same two routes, no middleware at all.

``python -m bench.bare_server --port N``. It does the least work those routes can do (a fixed
small JSON for health; read and parse the JSON body for the POST), with the access log off as
in TabAgent, so the gap to TabAgent is exactly what our middleware, routing and models cost.
"""

from __future__ import annotations

import argparse
import json

from aiohttp import web


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def set_log_level(request: web.Request) -> web.Response:
    body = json.loads(await request.read())
    return web.json_response({"level": body["level"], "previous": "WARNING"})


def build_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/v1/health", health)
    app.router.add_post("/v1/system/log-level", set_log_level)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bare_server", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    # run_app turns SIGTERM into a graceful exit; no access log and no banner, like TabAgent.
    web.run_app(build_app(), host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
