"""The fake Hub speaks the protocol huggingface_hub 2.4 expects, and misbehaves on demand."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from huggingface_hub import HfApi, RepoFile, constants, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import _detect_agent
from yarl import URL

from tests.fakehub import FakeHub

T = TypeVar("T")
REPO = "org/model"
EVIL = ["../../evil.gguf", "/etc/passwd", "a/../../b", "C:\\x", "ok/../../x"]


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """huggingface_hub allowed on the network (the fake only); returns a fresh cache_dir.

    HF_HUB_OFFLINE is read once, at import: the env var alone is not enough. The agent-harness
    registry, fetched from the *default* endpoint by the first request that builds headers, is
    pre-seeded empty so that nothing tries huggingface.co.
    """
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(_detect_agent, "_registry", _detect_agent._EMPTY_REGISTRY)
    return tmp_path / "hf-cache"


@pytest.fixture
async def hub() -> AsyncIterator[FakeHub]:
    async with FakeHub() as fake:
        yield fake


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def _download(repo: str, filename: str, **kwargs: Any) -> str:
    return str(hf_hub_download(repo, filename, **kwargs))


def _lfs_data(size: int = 5000, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


async def test_model_info_and_paged_tree(hub: FakeHub, online: Path) -> None:
    data = _lfs_data()
    files = {"config.json": b"{}", "w/a.gguf": data}
    files.update({f"d{i % 3}/f{i:03}.txt": b"%d" % i for i in range(120)})
    commit = hub.add_repo(REPO, files)
    api = HfApi(endpoint=hub.endpoint)

    info = await asyncio.to_thread(api.model_info, REPO, revision="main", files_metadata=True)
    assert info.sha == commit
    siblings = {s.rfilename: s for s in info.siblings or []}
    assert set(siblings) == set(files)
    lfs = siblings["w/a.gguf"].lfs
    assert siblings["w/a.gguf"].size == 5000
    assert lfs is not None
    assert lfs.sha256 == hashlib.sha256(data).hexdigest()
    assert siblings["config.json"].size == 2
    assert siblings["config.json"].lfs is None
    for revision in (None, commit):  # the default branch; a commit sha as revision
        assert (await asyncio.to_thread(api.model_info, REPO, revision=revision)).sha == commit

    tree = await asyncio.to_thread(lambda: list(api.list_repo_tree(REPO, recursive=True)))
    assert hub.stats.requests["tree"] == 3  # 122 files + 4 folders, 50 a page
    assert sorted(e.path for e in tree) == sorted([*files, "d0", "d1", "d2", "w"])
    entry = next(e for e in tree if e.path == "w/a.gguf")
    assert isinstance(entry, RepoFile)
    assert entry.lfs == lfs
    root = await asyncio.to_thread(lambda: list(api.list_repo_tree(REPO)))
    assert sorted(e.path for e in root) == ["config.json", "d0", "d1", "d2", "w"]
    sub = await asyncio.to_thread(lambda: list(api.list_repo_tree(REPO, path_in_repo="d1")))
    assert len(sub) == 40
    assert all(e.path.startswith("d1/") for e in sub)


def _check_cache(cache: Path, commit: str, small: str, big: str, blobs: tuple[str, str]) -> None:
    storage = cache / "models--org--model"
    assert Path(big) == storage / "snapshots" / commit / "w" / "a.gguf"
    assert Path(big).read_bytes() == _lfs_data()
    assert Path(big).resolve() == storage / "blobs" / blobs[1]  # the LFS sha256
    assert Path(small).resolve() == storage / "blobs" / blobs[0]  # the git blob sha1
    assert (storage / "refs" / "main").read_text() == commit


async def test_hf_hub_download_small_and_lfs(hub: FakeHub, online: Path) -> None:
    commit = hub.add_repo(REPO, {"config.json": b'{"a": 1}', "w/a.gguf": _lfs_data()})
    get = {"endpoint": hub.endpoint, "cache_dir": online}

    small = await asyncio.to_thread(_download, REPO, "config.json", **get)
    big = await asyncio.to_thread(_download, REPO, "w/a.gguf", **get)
    blobs = (hub.file_info(REPO, "config.json").oid, hashlib.sha256(_lfs_data()).hexdigest())
    await asyncio.to_thread(_check_cache, online, commit, small, big, blobs)
    assert hub.stats.requests["cdn_get"] == 1  # the LFS file, through the redirect
    assert hub.stats.requests["resolve_get"] == 1  # the small file, from the hub

    before = dict(hub.stats.requests)
    again = await asyncio.to_thread(_download, REPO, "w/a.gguf", local_files_only=True, **get)
    assert again == big
    assert dict(hub.stats.requests) == before


async def test_gated_repo_needs_the_token(online: Path) -> None:
    async with FakeHub(token="s3cret") as hub:
        hub.add_repo(REPO, {"w.gguf": _lfs_data()})
        api = HfApi(endpoint=hub.endpoint)
        with pytest.raises(GatedRepoError):
            await asyncio.to_thread(api.model_info, REPO, token=False)
        get = {"endpoint": hub.endpoint, "cache_dir": online}
        with pytest.raises(GatedRepoError):
            await asyncio.to_thread(_download, REPO, "w.gguf", token=False, **get)
        path = await asyncio.to_thread(_download, REPO, "w.gguf", token="s3cret", **get)
        assert await asyncio.to_thread(_sha256_of, path) == hashlib.sha256(_lfs_data()).hexdigest()


async def test_errors_map_to_huggingface_hub_exceptions(hub: FakeHub, online: Path) -> None:
    hub.add_repo(REPO, {"config.json": b"{}"})
    api, get = HfApi(endpoint=hub.endpoint), {"endpoint": hub.endpoint, "cache_dir": online}
    cases = [
        (RepositoryNotFoundError, "org/nope", "config.json", "main"),
        (EntryNotFoundError, REPO, "nope.json", "main"),
        (RevisionNotFoundError, REPO, "config.json", "nope"),
    ]
    for error, repo, name, rev in cases:
        with pytest.raises(error):
            await asyncio.to_thread(_download, repo, name, revision=rev, **get)
    with pytest.raises(RepositoryNotFoundError):
        await asyncio.to_thread(api.model_info, "org/nope")
    with pytest.raises(RevisionNotFoundError):
        await asyncio.to_thread(api.model_info, REPO, revision="nope")


async def test_listings_can_lie(hub: FakeHub, online: Path) -> None:
    hub.add_repo(REPO, {"config.json": b"{}"}, extra_siblings=["ghost.gguf"])
    hub.malicious_listing(REPO, EVIL)
    api = HfApi(endpoint=hub.endpoint)
    info = await asyncio.to_thread(api.model_info, REPO)
    assert [s.rfilename for s in info.siblings or []] == ["config.json", "ghost.gguf", *EVIL]
    tree = await asyncio.to_thread(lambda: list(api.list_repo_tree(REPO, recursive=True)))
    assert [e.path for e in tree] == ["config.json", "ghost.gguf", *EVIL]
    with pytest.raises(EntryNotFoundError):
        await asyncio.to_thread(
            _download, REPO, "ghost.gguf", endpoint=hub.endpoint, cache_dir=online
        )


async def test_ranges_and_no_range(hub: FakeHub, http: aiohttp.ClientSession) -> None:
    data = _lfs_data()
    hub.add_repo(REPO, {"a.gguf": data, "c.json": b"0123456789"})
    resolve = f"{hub.endpoint}/{REPO}/resolve/main"
    async with http.get(f"{resolve}/c.json", headers={"Range": "bytes=2-4"}) as resp:
        assert resp.status == 206  # a small file, from the hub itself
        assert await resp.read() == b"234"
    async with http.get(f"{resolve}/a.gguf", headers={"Range": "bytes=1-2"}) as resp:
        assert resp.url.port != URL(hub.endpoint).port  # redirected to the CDN
        assert await resp.read() == data[1:3]
    hub.stats.ranges.clear()
    url = f"{hub.cdn}/blobs/{hashlib.sha256(data).hexdigest()}"
    for header, start, end in [("bytes=100-199", 100, 199), ("bytes=4990-", 4990, 4999)]:
        async with http.get(url, headers={"Range": header}) as resp:
            assert resp.status == 206
            assert resp.headers["Accept-Ranges"] == "bytes"
            assert resp.headers["Content-Range"] == f"bytes {start}-{end}/5000"
            assert await resp.read() == data[start : end + 1]
    assert hub.stats.ranges == [(100, 199), (4990, 4999)]
    async with http.get(url, headers={"Range": "bytes=5000-"}) as resp:
        assert resp.status == 416
    async with http.head(url) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == "5000"
    hub.switches.no_range = True
    async with http.get(url, headers={"Range": "bytes=100-199"}) as resp:
        assert resp.status == 200
        assert "Accept-Ranges" not in resp.headers
        assert await resp.read() == data
    assert len(hub.stats.connections) == 1  # one keep-alive connection to the CDN


async def test_bandwidth_cap(hub: FakeHub, http: aiohttp.ClientSession) -> None:
    data = _lfs_data(2 * 1024 * 1024)
    hub.add_repo(REPO, {"a.gguf": data})
    hub.switches.bytes_per_second = 4e6
    url = f"{hub.cdn}/blobs/{hashlib.sha256(data).hexdigest()}"
    started = time.monotonic()
    async with http.get(url) as resp:
        assert await resp.read() == data
    assert 0.45 <= time.monotonic() - started < 2.0

    async def part(start: int) -> bytes:  # the cap is per response: parallel parts add up
        async with http.get(url, headers={"Range": f"bytes={start}-{start + 399_999}"}) as resp:
            return await resp.read()

    started = time.monotonic()
    parts = await asyncio.gather(*(part(start) for start in (0, 400_000, 800_000)))
    assert b"".join(parts) == data[:1_200_000]
    assert 0.09 <= time.monotonic() - started < 0.3  # 400 kB at 4 MB/s, three at once
    assert hub.stats.max_concurrent == 3
    assert len(hub.stats.connections) == 3


async def _read_into(resp: aiohttp.ClientResponse, sink: bytearray) -> None:
    async for chunk in resp.content.iter_any():
        sink += chunk


async def test_drop_stall_corrupt_and_5xx(hub: FakeHub, http: aiohttp.ClientSession) -> None:
    data = _lfs_data(600_000)
    hub.add_repo(REPO, {"a.gguf": data})
    url, sw = f"{hub.cdn}/blobs/{hashlib.sha256(data).hexdigest()}", hub.switches

    sw.drop_after_bytes, sw.drops = 300_000, 1
    got = bytearray()
    async with http.get(url) as resp:
        assert resp.headers["Content-Length"] == "600000"
        with pytest.raises(aiohttp.ClientPayloadError):
            await _read_into(resp, got)
    assert bytes(got) == data[:300_000]
    assert sw.drops == 0

    sw.stall_after_bytes, sw.stalls = 1000, 1
    got = bytearray()
    async with http.get(url, timeout=aiohttp.ClientTimeout(sock_read=0.5)) as resp:
        with pytest.raises(TimeoutError):
            await _read_into(resp, got)
    assert bytes(got) == data[:1000]

    sw.corrupt = True
    async with http.get(url) as resp:
        body = await resp.read()
    assert len(body) == len(data)
    assert body != data
    sw.corrupt = False

    sw.fail_5xx = 2
    statuses = []
    for _ in range(3):
        async with http.get(url) as resp:
            statuses.append(resp.status)
            body = await resp.read()
    assert statuses == [503, 503, 200]
    assert body == data
    assert hub.stats.max_concurrent == 1


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def _with_peak_rss(work: Awaitable[T]) -> tuple[T, int]:
    """The result of ``work`` and the process's peak RSS growth while it ran (sampled)."""
    baseline = peak = _rss()
    task = asyncio.ensure_future(work)
    while not (await asyncio.wait({task}, timeout=0.005))[0]:
        peak = max(peak, _rss())
    return task.result(), peak - baseline


async def _fetch(http: aiohttp.ClientSession, url: str) -> int:
    """Body bytes received, counted and dropped (up to a dropped connection)."""
    received = 0
    async with http.get(url) as resp:
        with contextlib.suppress(aiohttp.ClientPayloadError):
            async for chunk in resp.content.iter_chunked(1024 * 1024):
                received += len(chunk)
    return received


def _sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1024 * 1024):
            digest.update(block)
    return digest.hexdigest()


async def test_big_file_streams_fast_without_memory(
    hub: FakeHub, http: aiohttp.ClientSession, online: Path
) -> None:
    size = 256 * 1024 * 1024
    hub.add_big_file(REPO, "big.gguf", size, seed=7)
    sha256 = hub.file_info(REPO, "big.gguf").sha256
    assert sha256 is not None
    url = f"{hub.cdn}/blobs/{sha256}"
    async with http.get(url, headers={"Range": "bytes=0-1"}) as resp:  # warm the connection
        await resp.read()

    started = time.monotonic()
    received, growth = await _with_peak_rss(_fetch(http, url))  # sendfile from disk
    elapsed = time.monotonic() - started
    print(f"\n256 MiB in {elapsed:.2f} s = {size / elapsed / 1e6:.0f} MB/s, RSS +{growth} B")
    assert received == size
    assert size / elapsed > 300e6
    assert growth < 50e6

    hub.switches.drop_after_bytes, hub.switches.drops = 64 * 1024 * 1024, 1  # chunked path
    received, growth = await _with_peak_rss(_fetch(http, url))
    assert received == 64 * 1024 * 1024
    assert growth < 50e6
    start = size - 3 * 1024 * 1024 - 5  # a range across block boundaries, from disk
    async with http.get(url, headers={"Range": f"bytes={start}-"}) as resp:
        assert resp.status == 206
        assert await resp.read() == hub.read_blob(sha256, start)

    # End to end (huggingface_hub does not check the sha256 itself). The client's own buffers
    # dominate here: httpx2 reads 10 MiB chunks (DOWNLOAD_CHUNK_SIZE), ~40-55 MB of RSS.
    get = {"endpoint": hub.endpoint, "cache_dir": online}
    path, growth = await _with_peak_rss(asyncio.to_thread(_download, REPO, "big.gguf", **get))
    print(f"hf_hub_download: RSS +{growth} B")
    assert growth < 120e6  # streamed: far below the 256 MiB file
    assert await asyncio.to_thread(_sha256_of, path) == sha256
