"""A local stand-in for the Hugging Face Hub and its LFS CDN, speaking the protocol that
``huggingface_hub`` (2.4) and any other downloader use. It is the only fake of the test suite.

Two aiohttp servers on 127.0.0.1, ephemeral ports (different ports = different hosts to a client):

* the hub (``endpoint``): ``GET /api/models/{repo}[/revision/{rev}]`` (``?blobs=true`` adds sizes
  and LFS sha256), ``GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=&cursor=`` (paged, with
  ``Link: <next>; rel="next"``), and ``HEAD|GET /{repo}/resolve/{rev}/{path}``: small files served
  directly (``ETag`` = git blob sha1), LFS files answered with a 302 to the CDN carrying
  ``X-Linked-Etag: "<sha256>"`` and ``X-Linked-Size``. Errors carry ``X-Error-Code``
  (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo), as ``huggingface_hub`` maps them.
* the CDN (``cdn``): ``HEAD|GET /blobs/{sha256}`` with single ``Range`` support, streamed from
  memory or disk (sendfile when no switch needs the bytes), misbehaving on demand (``switches``).

Usage::

    async with FakeHub() as hub:
        commit = hub.add_repo("org/model", {"config.json": b"{}", "w.gguf": b"x" * 4096})
        hub.switches.drops, hub.switches.drop_after_bytes = 1, 1000
        ...  # point the code under test at hub.endpoint; assert on hub.stats

The servers share the test's event loop: call blocking clients (``hf_hub_download``) through
``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import itertools
import random
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Self
from urllib.parse import unquote

from aiohttp import web

CHUNK = 256 * 1024  # body chunk of the CDN's chunked path
_BLOCK = 1024 * 1024  # big files: a pseudo-random 1 MiB block, its first 8 bytes = block index
_FLIP = bytes(b ^ 0x5A for b in range(256))  # `corrupt`: a translate table changing every byte
_DATE = "2024-01-01T00:00:00.000Z"
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


@dataclass
class Switches:
    """Misbehaviour of the CDN, mutable at any time. Counters are consumed per blob request.

    A response reads the switches when it starts; ``bytes_per_second`` and ``corrupt`` are read
    again before every chunk. Responses with no switch set are sent with sendfile (from disk).
    """

    bytes_per_second: float | None = None  # per-response cap, paced with asyncio.sleep
    total_bytes_per_second: float | None = None  # one cap shared by every response (a full link)
    drop_after_bytes: int | None = None  # close the connection after this many body bytes ...
    drops: int = 0  # ... for this many GET requests
    stall_after_bytes: int | None = None  # then send nothing more, keep the connection open ...
    stalls: int = 0  # ... for this many GET requests (until the client hangs up)
    corrupt: bool = False  # every body byte XOR 0x5A (sizes and headers unchanged)
    no_range: bool = False  # ignore Range: 200 with the full body, no Accept-Ranges
    fail_5xx: int = 0  # answer 503 to this many requests (HEAD or GET) first


@dataclass
class Stats:
    """What the servers saw. ``requests`` keys: model_info, tree, resolve_head, resolve_get,
    cdn_head, cdn_get (every request, whatever its answer)."""

    requests: Counter[str] = field(default_factory=Counter)
    bytes_sent: int = 0  # CDN body bytes written to sockets
    ranges: list[tuple[int, int]] = field(default_factory=list)  # 206s served: (start, end incl.)
    connections: set[tuple[str, int]] = field(default_factory=set)  # CDN client (host, port)s
    active: int = 0  # CDN requests being answered now
    max_concurrent: int = 0  # the most CDN requests answered at once (= busy connections)


@dataclass(frozen=True)
class HubFile:
    """A file of a commit. LFS files live on the CDN as ``blobs/<sha256>``."""

    path: str
    size: int
    oid: str  # git blob sha1 (for an LFS file: of its pointer file)
    sha256: str | None = None  # set for LFS files
    pointer_size: int = 0
    data: bytes | None = None  # content of a non-LFS file; None and no sha256: resolve 404s
    raw: bool = False  # listed verbatim at the root of the tree (extra or malicious names)


Files = dict[str, HubFile]


@dataclass
class _Repo:
    refs: dict[str, str] = field(default_factory=dict)  # branch -> commit sha
    commits: dict[str, Files] = field(default_factory=dict)


class _HubError(Exception):
    def __init__(self, status: int, code: str, message: str, commit: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.commit = status, code, commit


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_file(path: str, size: int, sha256: str) -> HubFile:
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n"
    return HubFile(path, size, git_blob_sha1(pointer.encode()), sha256, len(pointer))


def _parse_range(header: str | None, size: int) -> tuple[int, int] | bool | None:
    """(start, end incl.) for one satisfiable range, None to serve it all, False for a 416."""
    match = _RANGE.fullmatch(header.strip()) if header else None
    if match is None or match.groups() == ("", ""):
        return None  # absent, malformed or several ranges: the whole body
    first, last = match.groups()
    if not first:  # suffix range: the last N bytes
        return (max(size - int(last), 0), size - 1) if int(last) and size else False
    if last and int(last) < int(first):
        return None  # invalid: ignored, as RFC 9110 says
    start, end = int(first), min(int(last) if last else size - 1, size - 1)
    return (start, end) if start <= end else False


class FakeHub:
    """The hub and its CDN, as an async context manager (see the module docstring)."""

    def __init__(self, *, token: str | None = None, page_size: int = 50) -> None:
        self.token, self.page_size = token, page_size
        self.switches, self.stats = Switches(), Stats()
        self._link_free_at = 0.0  # when total_bytes_per_second lets the next chunk go
        self.endpoint = self.cdn = ""
        self._repos: dict[str, _Repo] = {}
        self._blobs: dict[str, bytes | Path] = {}  # sha256 -> content or file
        self._serial = itertools.count()
        self._tmp: Path | None = None
        self._runners: list[web.AppRunner] = []
        self._closing = asyncio.Event()

    # -- content -----------------------------------------------------------------------------

    def add_repo(
        self,
        repo_id: str,
        files: Mapping[str, bytes],
        *,
        revision: str = "main",
        lfs_min_size: int = 1024,
        extra_siblings: Iterable[str] = (),
    ) -> str:
        """Commit ``files`` (the whole content) to branch ``revision``; return the commit sha.

        Files of ``lfs_min_size`` bytes or more go to LFS (served through the CDN). Names in
        ``extra_siblings`` are listed (siblings, root of the tree) but resolve answers 404.
        """
        entries = {name: HubFile(name, 0, git_blob_sha1(b""), raw=True) for name in extra_siblings}
        for path, data in files.items():
            if len(data) >= lfs_min_size:
                sha256 = hashlib.sha256(data).hexdigest()
                self._blobs[sha256] = bytes(data)
                entries[path] = _lfs_file(path, len(data), sha256)
            else:
                entries[path] = HubFile(path, len(data), git_blob_sha1(data), data=bytes(data))
        return self._commit(repo_id, revision, entries)

    def add_big_file(
        self, repo_id: str, path: str, size: int, *, seed: int = 0, revision: str = "main"
    ) -> str:
        """Add an LFS file of ``size`` deterministic bytes, written once to a temp file and served
        from disk, to branch ``revision`` (a new commit keeping its files); return the commit sha.
        Its sha256 is in ``file_info(...)``; its bytes in ``read_blob(...)``."""
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="fakehub-"))
        base = random.Random(seed).randbytes(_BLOCK)
        target, digest = self._tmp / f"big-{next(self._serial)}", hashlib.sha256()
        with target.open("wb") as out:
            for index in range(0, (size + _BLOCK - 1) // _BLOCK):
                block = (index.to_bytes(8, "little") + base[8:])[: size - index * _BLOCK]
                digest.update(block)
                out.write(block)
        sha256 = digest.hexdigest()
        self._blobs.setdefault(sha256, target)
        files = {**self._head(repo_id, revision), path: _lfs_file(path, size, sha256)}
        return self._commit(repo_id, revision, files)

    def malicious_listing(
        self, repo_id: str, names: Iterable[str], *, revision: str = "main"
    ) -> str:
        """List ``names`` (``../../evil.gguf``, ``/etc/passwd``, ``C:\\x``...) as files in the
        siblings and at the root of every tree listing of a new commit; a resolve of the exact
        name answers ``pwned``. A client must refuse them before writing anything."""
        files, data = self._head(repo_id, revision), b"pwned\n"
        for name in names:
            files[name] = HubFile(name, len(data), git_blob_sha1(data), data=data, raw=True)
        return self._commit(repo_id, revision, files)

    def file_info(self, repo_id: str, path: str, revision: str = "main") -> HubFile:
        return self._lookup(repo_id, revision)[1][path]

    def read_blob(self, sha256: str, start: int = 0, length: int | None = None) -> bytes:
        """The true bytes of a CDN blob (for assertions on ranges of big files)."""
        with _reader(self._blobs[sha256]) as reader:
            reader.seek(start)
            return reader.read(-1 if length is None else length)

    def _head(self, repo_id: str, revision: str) -> Files:
        """A copy of the files of branch ``revision`` (none for a new repo or branch)."""
        repo = self._repos.get(repo_id)
        return dict(repo.commits[repo.refs[revision]]) if repo and revision in repo.refs else {}

    def _commit(self, repo_id: str, revision: str, files: Files) -> str:
        key = f"{repo_id}\n{revision}\n{next(self._serial)}"  # deterministic for a given test
        sha = hashlib.sha1(key.encode()).hexdigest()
        repo = self._repos.setdefault(repo_id, _Repo())
        repo.commits[sha], repo.refs[revision] = files, sha
        return sha

    def _lookup(self, repo_id: str, revision: str) -> tuple[str, Files]:
        repo = self._repos.get(repo_id)
        if repo is None:
            raise _HubError(404, "RepoNotFound", f"Repository {repo_id} not found")
        sha = repo.refs.get(revision, revision)
        if sha not in repo.commits:
            raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return sha, repo.commits[sha]

    # -- servers -----------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        hub, cdn = web.Application(), web.Application()
        hub.router.add_route("*", "/{tail:.*}", self._hub)
        cdn.router.add_route("*", "/blobs/{sha256}", self._cdn)
        for app in (hub, cdn):  # handler_cancellation: a client hanging up ends a stall
            runner = web.AppRunner(
                app, access_log=None, handler_cancellation=True, shutdown_timeout=1
            )
            await runner.setup()
            self._runners.append(runner)
            await web.TCPSite(runner, "127.0.0.1", 0).start()
        self.endpoint, self.cdn = (f"http://127.0.0.1:{r.addresses[0][1]}" for r in self._runners)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._closing.set()  # releases stalled responses
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    # -- the hub -----------------------------------------------------------------------------

    async def _hub(self, request: web.Request) -> web.StreamResponse:
        parts = [unquote(part) for part in request.rel_url.raw_path.split("/")[1:]]
        api = parts[:2] == ["api", "models"]
        try:
            if self.token and request.headers.get("Authorization") != f"Bearer {self.token}":
                raise _HubError(401, "GatedRepo", "Access to this repo is restricted")
            route = _route(
                parts[2:] if api else parts, ("revision", "tree") if api else ("resolve",)
            )
            if route is None and api:
                return self._model_info(request, "/".join(parts[2:]), "main")
            if route is None:
                raise _HubError(404, "NotFound", "Not found")
            repo_id, kind, rev, path = route
            if kind == "revision":
                return self._model_info(request, repo_id, rev)
            if kind == "tree":
                return self._tree(request, repo_id, rev, path)
            return self._resolve(request, repo_id, rev, path)
        except _HubError as err:
            headers = {"X-Error-Code": err.code, "X-Error-Message": str(err)}
            if err.commit:
                headers["X-Repo-Commit"] = err.commit
            return web.json_response({"error": str(err)}, status=err.status, headers=headers)

    def _model_info(self, request: web.Request, repo_id: str, revision: str) -> web.Response:
        self.stats.requests["model_info"] += 1
        sha, commit = self._lookup(repo_id, revision)
        blobs = request.query.get("blobs", "").lower() in ("1", "true")
        siblings: list[dict[str, object]] = []
        for entry in sorted(commit.values(), key=_order):
            sibling: dict[str, object] = {"rfilename": entry.path}
            if blobs:
                sibling.update(size=entry.size, blobId=entry.oid)
                if entry.sha256:
                    lfs = {"sha256": entry.sha256, "size": entry.size}
                    sibling["lfs"] = {**lfs, "pointerSize": entry.pointer_size}
            siblings.append(sibling)
        info = {"id": repo_id, "sha": sha, "private": False, "gated": bool(self.token) and "auto"}
        info.update(disabled=False, lastModified=_DATE, createdAt=_DATE, siblings=siblings)
        return web.json_response(info)

    def _tree(self, request: web.Request, repo_id: str, rev: str, base: str) -> web.Response:
        self.stats.requests["tree"] += 1
        _, commit = self._lookup(repo_id, rev)
        recursive = request.query.get("recursive", "").lower() in ("1", "true")
        prefix = f"{base}/" if base else ""
        tree = [f for f in commit.values() if not f.raw]
        dirs = {
            "/".join(f.path.split("/")[:i]) for f in tree for i in range(1, f.path.count("/") + 1)
        }
        if base and base not in dirs:
            raise _HubError(404, "EntryNotFound", f"{base} does not exist on {rev}")

        def wanted(path: str) -> bool:
            rest = path[len(prefix) :]
            return path.startswith(prefix) and bool(rest) and (recursive or "/" not in rest)

        entries: list[dict[str, object]] = [
            {"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
            for d in sorted(filter(wanted, dirs))
        ]
        entries += [_tree_entry(f) for f in sorted(tree, key=_order) if wanted(f.path)]
        if not base:  # extra and malicious names sit at the root, whatever they look like
            entries += [_tree_entry(f) for f in commit.values() if f.raw]
        cursor = int(request.query.get("cursor", "0"))
        page = entries[cursor : cursor + self.page_size]
        headers = {}
        if cursor + self.page_size < len(entries):
            nxt = request.url.update_query(cursor=str(cursor + self.page_size))
            headers["Link"] = f'<{nxt}>; rel="next"'
        return web.json_response(page, headers=headers)

    def _resolve(self, request: web.Request, repo_id: str, rev: str, path: str) -> web.Response:
        self.stats.requests[f"resolve_{request.method.lower()}"] += 1
        sha, commit = self._lookup(repo_id, rev)
        entry = commit.get(path)
        if entry is None or (entry.data is None and entry.sha256 is None):
            raise _HubError(404, "EntryNotFound", f"{path} does not exist on {rev}", commit=sha)
        headers = {"X-Repo-Commit": sha, "ETag": f'"{entry.oid}"', "Accept-Ranges": "bytes"}
        if entry.data is not None:  # served by the hub itself, no switches
            body, wanted = entry.data, _parse_range(request.headers.get("Range"), entry.size)
            if isinstance(wanted, tuple):
                body = body[wanted[0] : wanted[1] + 1]
                headers["Content-Range"] = f"bytes {wanted[0]}-{wanted[1]}/{entry.size}"
            headers["Content-Length"] = str(len(body))  # also on HEAD, even for 0 bytes
            return web.Response(
                status=206 if isinstance(wanted, tuple) else 200,
                body=None if request.method == "HEAD" else body,
                headers=headers,
                content_type="application/octet-stream",
            )
        headers["Location"] = f"{self.cdn}/blobs/{entry.sha256}"  # absolute: the client keeps it
        headers["X-Linked-Etag"], headers["X-Linked-Size"] = f'"{entry.sha256}"', str(entry.size)
        return web.Response(status=302, headers=headers)

    # -- the CDN -----------------------------------------------------------------------------

    async def _cdn(self, request: web.Request) -> web.StreamResponse:
        stats, peer = self.stats, request.transport and request.transport.get_extra_info("peername")
        stats.requests[f"cdn_{request.method.lower()}"] += 1
        stats.connections.update([(str(peer[0]), int(peer[1]))] if peer else [])
        stats.active += 1
        stats.max_concurrent = max(stats.max_concurrent, stats.active)
        try:
            return await self._blob(request, request.match_info["sha256"])
        finally:
            stats.active -= 1

    async def _blob(self, request: web.Request, sha256: str) -> web.StreamResponse:
        sw = self.switches
        source = self._blobs.get(sha256)
        if source is None:
            return web.Response(status=404, text="NoSuchKey")
        if sw.fail_5xx > 0:
            sw.fail_5xx -= 1
            return web.Response(status=503, text="Service Unavailable (fake)")
        size = source.stat().st_size if isinstance(source, Path) else len(source)
        start, end, status = 0, size - 1, 200
        headers = {"ETag": f'"{sha256}"', "Content-Type": "application/octet-stream"}
        if not sw.no_range:
            headers["Accept-Ranges"] = "bytes"
            wanted = _parse_range(request.headers.get("Range"), size)
            if wanted is False:
                return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
            if isinstance(wanted, tuple):
                (start, end), status = wanted, 206
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        headers["Content-Length"] = str(end - start + 1)
        if request.method == "HEAD":
            return web.Response(status=status, headers=headers)
        if status == 206:
            self.stats.ranges.append((start, end))
        drop = stall = None
        if sw.drops > 0 and sw.drop_after_bytes is not None:
            sw.drops, drop = sw.drops - 1, sw.drop_after_bytes
        if sw.stalls > 0 and sw.stall_after_bytes is not None:
            sw.stalls, stall = sw.stalls - 1, sw.stall_after_bytes
        response = web.StreamResponse(status=status, headers=headers)
        await response.prepare(request)
        paced = sw.bytes_per_second or sw.total_bytes_per_second
        plain = drop is None and stall is None and not sw.corrupt and not paced
        try:
            if plain and isinstance(source, Path) and request.transport is not None:
                with source.open("rb") as handle:
                    await asyncio.get_running_loop().sendfile(
                        request.transport, handle, start, end - start + 1
                    )
                self.stats.bytes_sent += end - start + 1
            else:
                limit = min(x for x in (drop, stall, end - start + 1) if x is not None)
                await self._stream(response, source, start, limit)
                if limit == drop and request.transport is not None:
                    request.transport.close()  # flushes what was written, then FIN
                    return response
                if limit == stall:
                    await self._closing.wait()  # or cancelled when the client hangs up
                    return response
            await response.write_eof()
        except ConnectionError:
            pass  # the client hung up; aiohttp closes the connection
        return response

    async def _stream(
        self, response: web.StreamResponse, source: bytes | Path, start: int, length: int
    ) -> None:
        """Write ``length`` bytes from ``start`` in chunks, honouring the rate cap and corrupt."""
        loop, sw, sent = asyncio.get_running_loop(), self.switches, 0
        allowed_at = loop.time()
        with _reader(source) as reader:
            reader.seek(start)
            while sent < length:
                rate = sw.bytes_per_second
                count = min(CHUNK, length - sent)
                if rate:  # pay before sending: no burst, the cap holds over every prefix
                    count = min(count, max(1024, int(rate / 20)))
                    allowed_at = max(allowed_at, loop.time()) + count / rate
                    await asyncio.sleep(allowed_at - loop.time())
                if total := sw.total_bytes_per_second:  # a slot on the link's shared clock
                    count = min(count, max(1024, int(total / 200)))
                    self._link_free_at = max(self._link_free_at, loop.time()) + count / total
                    await asyncio.sleep(self._link_free_at - loop.time())
                chunk = reader.read(count)
                if sw.corrupt:
                    chunk = chunk.translate(_FLIP)
                await response.write(chunk)
                sent += len(chunk)
                self.stats.bytes_sent += len(chunk)


def _route(parts: list[str], kinds: tuple[str, ...]) -> tuple[str, str, str, str] | None:
    """(repo_id, kind, revision, path) of ``{repo}/{kind}/{rev}[/{path}]``, repo ids being
    ``org/name`` or ``name``."""
    for n in (2, 1):
        if len(parts) > n + 1 and parts[n] in kinds:
            return "/".join(parts[:n]), parts[n], parts[n + 1], "/".join(parts[n + 2 :])
    return None


def _order(entry: HubFile) -> tuple[bool, str]:
    return (True, "") if entry.raw else (False, entry.path)  # raw names last, as they were given


def _tree_entry(entry: HubFile) -> dict[str, object]:
    item: dict[str, object] = {"type": "file", "oid": entry.oid, "size": entry.size}
    item["path"] = entry.path
    if entry.sha256:
        item["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": entry.pointer_size}
    return item


def _reader(source: bytes | Path) -> BinaryIO:
    return source.open("rb") if isinstance(source, Path) else io.BytesIO(source)
