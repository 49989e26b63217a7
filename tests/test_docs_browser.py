"""The API docs render in real headless Chromium with the network cut off, and show the operations.

``tabagent-server`` runs as a user runs it; Chromium (driven over the DevTools protocol, see
``tests/browser.py``) can reach loopback and nothing else. For each viewer we wait, with a
deadline, until its DOM shows every operation of the served OpenAPI document, then check that
every request the page (and its workers) made went to the server itself: a viewer that reaches
for a CDN (scripts, fonts, logos, telemetry) fails here even when the page still looks right.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.browser import DEBIAN_PACKAGES, Page, chromium, chromium_binary, off_host
from tests.helpers import RunningServer, http_get, isolate, running_server

pytestmark = pytest.mark.browser

# Operations the docs must show whatever else the spec grows: operationId -> (method, path).
KNOWN = {
    "system.health": ("get", "/v1/health"),
    "system.info": ("get", "/v1/system"),
    "system.operations": ("get", "/v1/system/operations"),
    "system.set_log_level": ("post", "/v1/system/log-level"),
}
_HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}

Op = tuple[str, str, str]  # method, path, summary

SWAGGER_OPS = """
Array.from(document.querySelectorAll('#swagger-ui .opblock'), (block) => ({
  method: (block.querySelector('.opblock-summary-method')?.textContent ?? '').trim(),
  path: block.querySelector('.opblock-summary-path')?.dataset.path ?? '',
  summary: (block.querySelector('.opblock-summary-description')?.textContent ?? '').trim(),
}))
"""
SWAGGER_TITLE = "document.querySelector('#swagger-ui .info .title')?.textContent ?? ''"

# ReDoc 2 renders every operation on one page (sections ``operation/<operationId>``); ReDoc 3
# lists them on an overview page (links ``#/<tag>/<operationId>``) and shows one at a time.
REDOC_VIEW = """
(() => {
  const root = document.getElementById('redoc');
  return {
    text: root.textContent,
    refs: Array.from(root.querySelectorAll('a[href], [data-section-id]'),
      (el) => el.getAttribute('data-section-id') ?? el.getAttribute('href')),
  };
})()
"""

REDOC_HEADINGS = """
Array.from(document.querySelectorAll('#redoc h1, #redoc h2, #redoc h3'),
  (heading) => heading.textContent.trim())
"""

# RapiDoc renders into the shadow DOM of <rapi-doc>, one "section-operation" part per operation.
RAPIDOC_OPS = """
(() => {
  const root = document.querySelector('rapi-doc')?.shadowRoot;
  const text = (el, sel) => (el.querySelector(sel)?.textContent ?? '').trim();
  return root ? Array.from(root.querySelectorAll('[part~="section-operation"]'), (op) => ({
    method: text(op, '[part~="label-operation-method"]'),
    path: text(op, '[part~="label-operation-path"]'),
    summary: text(op, '[part~="section-operation-summary"]'),
  })) : [];
})()
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One server for the module, in its own HOME (``isolated_home`` is per test)."""
    home = tmp_path_factory.mktemp("docs-browser-home")
    with pytest.MonkeyPatch.context() as mp:
        isolate(mp, home)
        with running_server(log_dir=home) as running:
            yield running


@pytest.fixture(scope="module")
def operations(server: RunningServer) -> list[Op]:
    """Every operation of the served spec, checked to include the ones we know."""
    status, body = http_get(f"{server.base_url}/api-doc/openapi.json")
    assert status == 200, body[:500]
    spec = json.loads(body)
    found: dict[str, tuple[str, str]] = {}
    ops: list[Op] = []
    for path, item in spec["paths"].items():
        for method, op in item.items():
            if method in _HTTP_METHODS:
                found[op["operationId"]] = (method, path)
                ops.append((method, path, op.get("summary", "").strip()))
    assert {op_id: found.get(op_id) for op_id in KNOWN} == KNOWN
    assert all(summary for _, _, summary in ops), "every operation needs a summary"
    return sorted(ops)


@contextlib.asynccontextmanager
async def viewer(server: RunningServer, name: str) -> AsyncIterator[Page]:
    """``/api-doc/<name>`` in a fresh offline Chromium; on exit, waits for the network to settle
    so that requests made late (lazy fonts, logos, telemetry) are recorded too."""
    async with chromium() as browser:
        page = await browser.new_page()
        await page.goto(f"{server.base_url}/api-doc/{name}")
        yield page
        await page.wait_network_idle()


def _browser_favicon(entry: str, server: RunningServer) -> bool:
    """Chromium asks for /favicon.ico by itself when a page names no icon: not the docs' doing."""
    return entry.endswith(f"{server.base_url}/favicon.ico") and "404" in entry


def assert_stayed_local(page: Page, server: RunningServer, name: str, *assets: str) -> None:
    report = page.report()
    netloc = urlsplit(server.base_url).netloc
    strays = off_host(page.requests, netloc)
    assert strays == [], f"the page reached beyond {netloc}: {strays}\n{report}"
    fetched = {urlsplit(url).path for url in page.requests}
    expected = {f"/api-doc/{name}", "/api-doc/openapi.json", *assets}
    assert expected <= fetched, f"missing {expected - fetched}\n{report}"
    assert page.failed == [], report
    assert [s for s in page.bad_status if not _browser_favicon(s, server)] == [], report
    assert [e for e in page.errors if not _browser_favicon(e, server)] == [], report


def _contains(item: str) -> Callable[[list[str]], bool]:
    return lambda values: item in values


def _ops(rendered: list[dict[str, str]]) -> list[Op]:
    return sorted((op["method"].lower(), op["path"], op["summary"]) for op in rendered)


async def test_swagger_ui_renders_every_operation_offline(
    server: RunningServer, operations: list[Op]
) -> None:
    async with viewer(server, "swagger") as page:
        rendered = await page.wait_for(
            SWAGGER_OPS, lambda ops: len(ops) >= len(operations), what="Swagger UI .opblock"
        )
        assert _ops(rendered) == operations
        assert "TabAgent API" in await page.evaluate(SWAGGER_TITLE)
    assert_stayed_local(
        page,
        server,
        "swagger",
        "/api-doc/assets/swagger/js/swagger-ui-bundle.js",
        "/api-doc/assets/swagger/css/swagger-ui.css",
    )


async def test_redoc_renders_every_operation_offline(
    server: RunningServer, operations: list[Op]
) -> None:
    def shows_all(view: dict[str, Any] | None) -> bool:
        if not view:
            return False
        # ReDoc 3's overview lists only some operations per tag: hold it to the known ones.
        text, refs = view["text"], view["refs"]
        return all(
            path in text and any(ref.endswith(op_id) for ref in refs)
            for op_id, (_, path) in KNOWN.items()
        )

    async with viewer(server, "redoc") as page:
        view = await page.wait_for(
            "document.getElementById('redoc') && " + REDOC_VIEW,
            shows_all,
            what="ReDoc lists every path and operationId",
        )
        assert "TabAgent API" in view["text"]
        # Follow each known operation's link, as a reader does: its summary becomes a heading.
        summaries = {(m, p): s for m, p, s in operations}
        for op_id, (method, path) in KNOWN.items():
            ref = next(ref for ref in view["refs"] if ref.endswith(op_id))
            anchor = ref if ref.startswith("#") else f"#{ref}"
            await page.evaluate(f"location.hash = {json.dumps(anchor)}")
            await page.wait_for(
                REDOC_HEADINGS,
                _contains(summaries[method, path]),
                what=f"ReDoc shows {op_id}'s summary as a heading at {anchor}",
            )
    assert_stayed_local(page, server, "redoc", "/api-doc/assets/redoc/js/redoc.standalone.js")


async def test_rapidoc_renders_every_operation_offline(
    server: RunningServer, operations: list[Op]
) -> None:
    async with viewer(server, "rapidoc") as page:
        rendered = await page.wait_for(
            RAPIDOC_OPS, lambda ops: len(ops) >= len(operations), what="RapiDoc operations"
        )
        assert _ops(rendered) == operations
    assert_stayed_local(page, server, "rapidoc", "/api-doc/assets/rapidoc/js/rapidoc-min.js")


def test_missing_chromium_fails_naming_the_debian_packages(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no chromium on PATH
    with pytest.raises(pytest.fail.Exception, match=DEBIAN_PACKAGES) as failure:
        chromium_binary()
    assert "apt-get install" in str(failure.value)
