"""The test suite's fake Hub in its own process, for benchmarks: ``python -m bench.hub_server``.

Serves one repo ``bench/big`` holding ``model-Q4_K_M.gguf`` of ``--size-mib`` MiB. A control app
on a second port answers ``GET /stats`` (CDN bytes sent) and ``POST /switches`` (JSON: the
fake's switches, e.g. ``{"bytes_per_second": 20000000}``). Prints ``READY <hub> <control>``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from dataclasses import fields

from aiohttp import web

from tests.fakehub import FakeHub

REPO, FILE = "bench/big", "model-Q4_K_M.gguf"


async def serve(size_mib: int) -> None:
    async with FakeHub() as hub:
        hub.add_big_file(REPO, FILE, size_mib * 1024 * 1024, seed=42)
        names = {f.name for f in fields(hub.switches)}

        async def stats(request: web.Request) -> web.Response:
            return web.json_response({"bytes_sent": hub.stats.bytes_sent})

        async def switches(request: web.Request) -> web.Response:
            for key, value in (await request.json()).items():
                if key in names:
                    setattr(hub.switches, key, value)
            return web.json_response({"ok": True})

        app = web.Application()
        app.router.add_get("/stats", stats)
        app.router.add_post("/switches", switches)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        print(f"READY {hub.endpoint} http://127.0.0.1:{port}", flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=256)
    asyncio.run(serve(parser.parse_args().size_mib))


if __name__ == "__main__":
    main()
