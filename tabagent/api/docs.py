"""API docs (Swagger UI, ReDoc, RapiDoc) and the web UI, all served from local files.

A desktop server must show its docs with no internet: the three viewers' bundles come from
wheels installed with the project (``flask-openapi-swagger``/``-redoc``/``-rapidoc``). We locate
their folders with ``importlib.util.find_spec`` and never import them (that would import flask).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler

from tabagent.api.keys import OPENAPI
from tabagent.api.middleware import add_route, mark_public
from tabagent.errors import NotFound, ServiceUnavailable

OPENAPI_PATH = "/api-doc/openapi.json"
ASSETS_PREFIX = "/api-doc/assets/"
WEB_DIR = Path(__file__).resolve().parent.parent / "web"

# viewer -> (package that carries it, folder inside the package)
_VIEWERS = {
    "swagger": ("flask_openapi_swagger", "templates/swagger"),
    "redoc": ("flask_openapi_redoc", "templates/redoc"),
    "rapidoc": ("flask_openapi_rapidoc", "templates/rapidoc"),
}

_PAGES = {
    "swagger": """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>TabAgent API · Swagger UI</title>
<link rel="icon" href="/api-doc/assets/swagger/images/swagger.svg">
<link rel="stylesheet" href="/api-doc/assets/swagger/css/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="/api-doc/assets/swagger/js/swagger-ui-bundle.js"></script>
<script>
window.ui = SwaggerUIBundle({url: "%(spec)s", dom_id: "#swagger-ui", deepLinking: true,
  validatorUrl: null, presets: [SwaggerUIBundle.presets.apis]});
</script></body></html>""",
    "redoc": """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>TabAgent API · ReDoc</title>
<link rel="icon" href="/api-doc/assets/redoc/images/redoc.svg"></head>
<body><div id="redoc"></div>
<script type="module">
import {init} from "/api-doc/assets/redoc/js/redoc.standalone.js";
init("%(spec)s", {hideDownloadButton: false, disableTelemetry: true},
  document.getElementById("redoc"));
</script>
</body></html>""",
    "rapidoc": """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>TabAgent API · RapiDoc</title>
<link rel="icon" href="/api-doc/assets/rapidoc/images/rapidoc.svg">
<script type="module" src="/api-doc/assets/rapidoc/js/rapidoc-min.js"></script></head>
<body><rapi-doc spec-url="%(spec)s" render-style="read" show-header="false"
  allow-try="true" load-fonts="false"></rapi-doc></body></html>""",
}

_INDEX = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>TabAgent API docs</title></head>
<body><h1>TabAgent API</h1>
<ul>
<li><a href="/api-doc/swagger">Swagger UI</a> (try requests)</li>
<li><a href="/api-doc/redoc">ReDoc</a> (reference)</li>
<li><a href="/api-doc/rapidoc">RapiDoc</a></li>
<li><a href="%(spec)s">OpenAPI 3.1 document (JSON)</a></li>
</ul></body></html>"""


# ReDoc's sidebar always shows Redocly's logo from their CDN (no option turns it off): serve
# the bundle with that address pointed at the logo its wheel ships, so the page stays offline.
_REDOC_BUNDLE = "js/redoc.standalone.js"
_REDOC_CDN_LOGO = re.compile(r"https://cdn\.redoc\.ly/redoc/logo-mini(?:-full)?\.svg")
_REDOC_LOCAL_LOGO = "/api-doc/assets/redoc/images/redoc.svg"


def viewer_dir(viewer: str) -> Path | None:
    package, sub = _VIEWERS[viewer]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / sub
    return folder if folder.is_dir() else None


def _html(body: str) -> web.Response:
    return web.Response(text=body, content_type="text/html")


def add_docs_routes(app: web.Application) -> None:
    @mark_public
    async def openapi_json(request: web.Request) -> web.Response:
        return web.json_response(request.app[OPENAPI])

    @mark_public
    async def index(request: web.Request) -> web.Response:
        return _html(_INDEX % {"spec": OPENAPI_PATH})

    add_route(app, "GET", OPENAPI_PATH, openapi_json, name="openapi")
    add_route(app, "GET", "/api-doc", index, name="api-doc")
    for viewer in _VIEWERS:
        folder = viewer_dir(viewer)
        if folder is not None and viewer == "redoc" and (folder / _REDOC_BUNDLE).is_file():
            bundle = f"{ASSETS_PREFIX}redoc/{_REDOC_BUNDLE}"
            add_route(app, "GET", bundle, _redoc_bundle(folder), name="redoc-bundle")
        if folder is not None:
            files = f"{ASSETS_PREFIX}{viewer}/{{tail:.+}}"
            add_route(app, "GET", files, _files(folder), name=f"assets-{viewer}")
        add_route(app, "GET", f"/api-doc/{viewer}", _viewer_page(viewer, folder), name=viewer)


def _redoc_bundle(folder: Path) -> Handler:
    text = (folder / _REDOC_BUNDLE).read_text(encoding="utf-8")
    body = _REDOC_CDN_LOGO.sub(_REDOC_LOCAL_LOGO, text).encode()

    @mark_public
    async def bundle(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="text/javascript", charset="utf-8")

    return bundle


def _viewer_page(viewer: str, folder: Path | None) -> Handler:
    page = _PAGES[viewer]
    package = _VIEWERS[viewer][0].replace("_", "-")

    @mark_public
    async def show(request: web.Request) -> web.Response:
        if folder is None:
            raise ServiceUnavailable(
                f"{viewer} assets are not installed; reinstall TabAgent (needs {package})",
                code="docs_assets_missing",
            )
        return _html(page % {"spec": OPENAPI_PATH})

    return show


def add_web_ui(app: web.Application, web_dir: Path = WEB_DIR) -> None:
    """Serve the web UI folder at ``/``; registered last so API routes always win."""
    add_route(app, "GET", "/{tail:.*}", _files(web_dir), name="web-ui")


def _files(folder: Path) -> Handler:
    """The files under ``folder`` named by the route's ``{tail}``, never one outside it; a
    folder answers with its ``index.html``."""
    root = folder.resolve()

    @mark_public
    async def serve_file(request: web.Request) -> web.FileResponse:
        target = (root / request.match_info["tail"]).resolve()
        if target.is_relative_to(root) and target.is_dir():
            target = target / "index.html"
        if not target.is_relative_to(root) or not target.is_file():
            raise NotFound(f"no route for {request.method} {request.path}")
        return web.FileResponse(target)

    return serve_file
