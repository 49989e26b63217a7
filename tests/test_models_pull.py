"""Pulling models from a local fake of the Hugging Face Hub: parallel, verified, resumable,
safe against hostile listings, compatible with huggingface_hub's cache, and usable by chat."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tabagent.errors import BadRequest, ChecksumMismatch
from tabagent.ml.orchestrator import pulled_specs
from tabagent.models.cache import ModelCache, blob_digest
from tabagent.models.downloader import (
    UNSYNCED_SUFFIX,
    RemoteFile,
    Tuning,
    _Download,
    download,
    make_durable,
    new_session,
    unsynced_marker,
)
from tabagent.models.pull import Puller
from tabagent.models.refs import parse_ref
from tests.fakehub import FakeHub
from tests.helpers import SERVER_BIN

MiB = 1024 * 1024
REPO = "test-org/big-model"


@pytest.fixture
async def hub(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeHub]:
    async with FakeHub() as fake:
        monkeypatch.setenv("HF_ENDPOINT", fake.endpoint)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        yield fake


def add_big(hub: FakeHub, path: str, size: int, seed: int = 0) -> str:
    """Add an LFS file to REPO; returns its sha256 (the blob name)."""
    hub.add_big_file(REPO, path, size, seed=seed)
    sha = hub.file_info(REPO, path).sha256
    assert sha is not None
    return sha


def fast_tuning(**overrides: float) -> Tuning:
    tuning = Tuning(connections=8, min_part=1 * MiB, stall_timeout=1.0, backoff=0.01)
    for key, value in overrides.items():
        setattr(tuning, key, value)
    return tuning


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink()}


async def test_parallel_download_is_verified_and_laid_out_like_the_hf_cache(
    hub: FakeHub, tmp_path: Path
) -> None:
    hub.add_repo(REPO, {"README.md": b"# a model\n"})
    commit = hub.add_big_file(REPO, "model-Q4_K_M.gguf", 24 * MiB, seed=1)
    sha = hub.file_info(REPO, "model-Q4_K_M.gguf").sha256
    cache = ModelCache(tmp_path / "cache", shared=[])
    puller = Puller(cache, fast_tuning())
    model = await puller.pull(parse_ref(REPO))
    assert [f.path for f in model.files] == ["model-Q4_K_M.gguf"]
    assert model.commit == commit
    snapshot = cache.snapshot_path(REPO, commit, "model-Q4_K_M.gguf")
    assert snapshot.is_symlink()
    assert snapshot.resolve() == (cache.repo_dir(REPO) / "blobs" / sha).resolve()
    assert sha256_of(snapshot) == sha
    assert (cache.repo_dir(REPO) / "refs" / "main").read_text() == commit
    assert hub.stats.max_concurrent > 1  # really parallel
    assert not [n for n in files_under(cache.root) if "partial" in n or "parts.json" in n]


async def test_connections_are_added_while_they_add_speed(hub: FakeHub, tmp_path: Path) -> None:
    """Capped per connection (as many CDNs are), each step of connections raises the rate, so
    the download grows to its maximum; on a link that is already full, a step that does not pay
    is taken back, and it never opens its maximum."""
    sha = add_big(hub, "model-Q4_K_M.gguf", 24 * MiB, seed=11)
    tuning = fast_tuning(connections=8, initial_connections=2, ramp_interval=0.15)
    hub.switches.bytes_per_second = 2 * MiB  # per connection
    capped = Puller(ModelCache(tmp_path / "a", shared=[]), tuning)
    model = await capped.pull(parse_ref(REPO))
    assert sha256_of(ModelCache(tmp_path / "a").blob_path(REPO, sha)) == sha
    assert capped.counters[0].connections == 8
    assert hub.stats.max_concurrent == 8

    hub.switches.bytes_per_second = None
    hub.switches.total_bytes_per_second = 8 * MiB  # the whole link: more connections can't help
    hub.stats.max_concurrent = 0
    tuning.ramp_interval = 0.3  # a longer window: the link's rate is measured, not its noise
    full = Puller(ModelCache(tmp_path / "b", shared=[]), tuning)
    again = await full.pull(parse_ref(REPO))
    assert again.files[0].size == model.files[0].size == 24 * MiB
    assert full.counters[0].connections < tuning.connections
    assert hub.stats.max_concurrent < tuning.connections


async def test_a_complete_pull_uses_no_network(hub: FakeHub, tmp_path: Path) -> None:
    add_big(hub, "model-Q8_0.gguf", 2 * MiB)
    cache = ModelCache(tmp_path / "cache", shared=[])
    await Puller(cache, fast_tuning()).pull(parse_ref(f"{REPO}:Q8_0"))
    before = sum(hub.stats.requests.values())
    again = await Puller(cache, fast_tuning()).pull(parse_ref(f"{REPO}:Q8_0"))
    assert sum(hub.stats.requests.values()) == before
    assert again.files[0].path == "model-Q8_0.gguf"


async def test_a_pulled_blob_is_flushed_to_the_disk_after_it_is_usable(
    hub: FakeHub, tmp_path: Path
) -> None:
    sha = add_big(hub, "model-Q4_K_M.gguf", 8 * MiB, seed=21)
    cache = ModelCache(tmp_path / "cache", shared=[])
    puller = Puller(cache, fast_tuning())
    model = await puller.pull(parse_ref(REPO))
    blob = cache.blob_path(REPO, sha)
    assert sha256_of(cache.snapshot_path(REPO, model.commit, model.files[0].path)) == sha
    await puller.durable()
    assert not unsynced_marker(blob).exists()
    assert not cache.syncing
    assert not [n for n in files_under(cache.root) if n.endswith(UNSYNCED_SUFFIX)]


async def test_a_downloaded_blob_keeps_its_unsynced_marker_until_it_is_flushed(
    hub: FakeHub, tmp_path: Path
) -> None:
    commit = hub.add_big_file(REPO, "model-Q4_K_M.gguf", 2 * MiB, seed=23)
    sha = hub.file_info(REPO, "model-Q4_K_M.gguf").sha256
    assert sha is not None
    dest = tmp_path / "blobs" / sha
    remote = RemoteFile(
        f"{hub.endpoint}/{REPO}/resolve/{commit}/model-Q4_K_M.gguf", 2 * MiB, sha, "model"
    )
    async with new_session(4) as session:
        await download(session, remote, dest, tuning=fast_tuning())
    assert sha256_of(dest) == sha  # usable at once ...
    assert unsynced_marker(dest).exists()  # ... and marked until its flush
    make_durable(dest)
    assert not unsynced_marker(dest).exists()
    assert sorted(p.name for p in dest.parent.iterdir()) == [sha]


async def test_hashing_maps_only_what_the_file_holds(tmp_path: Path) -> None:
    """Blocks are hashed from a mapping of the file, at any offset; a file cut shorter behind
    the download's back is read instead, so its short read is reported as before."""
    data = os.urandom(3 * MiB + 12345)
    path = tmp_path / "partial"
    path.write_bytes(data)
    remote = RemoteFile("http://unused.invalid/", len(data), None, "model")
    job = _Download(None, remote, tmp_path / "blob", fast_tuning(), {}, None)  # type: ignore[arg-type]
    job.fd = os.open(path, os.O_RDONLY)
    try:
        assert job._hash_block(0, 100_001) == 100_001  # then unaligned offsets, as a prefix gives
        assert job._hash_block(100_001, 2 * MiB) == 2 * MiB
        assert job._hash_block(100_001 + 2 * MiB, 2 * MiB) == len(data) - 100_001 - 2 * MiB
        assert job._hasher.hexdigest() == hashlib.sha256(data).hexdigest()
        assert job._hash_block(len(data), MiB) == 0  # nothing left: the caller's short read
    finally:
        os.close(job.fd)


def test_blob_digest_names_git_blobs_by_sha1_and_lfs_blobs_by_sha256(tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.write_bytes(b"hello\n")
    git_sha1 = "ce013625030ba8dba906f756967f9e9ca394464a"  # `git hash-object` of "hello\n"
    assert blob_digest(small, git_sha1) == git_sha1
    assert blob_digest(small, "0" * 64) == hashlib.sha256(b"hello\n").hexdigest()


async def test_a_blob_whose_flush_a_power_cut_interrupted_is_checked_before_use(
    hub: FakeHub, tmp_path: Path
) -> None:
    """A marker left beside a blob means its data may never have reached the disk: intact data
    proves itself by its hash and is kept; data the disk lost is deleted and fetched again."""
    sha = add_big(hub, "model-Q4_K_M.gguf", 4 * MiB, seed=22)
    cache = ModelCache(tmp_path / "cache", shared=[])
    first = Puller(cache, fast_tuning())
    await first.pull(parse_ref(REPO))
    await first.durable()
    blob = cache.blob_path(REPO, sha)

    assert [spec.check for spec in pulled_specs(cache)] == [None]  # flushed: nothing to check

    unsynced_marker(blob).touch()  # intact: the flush finished but its marker was not removed
    requests = sum(hub.stats.requests.values())
    after = ModelCache(tmp_path / "cache", shared=[])  # as the next start of the server
    (spec,) = pulled_specs(after)  # listed at once; hashed only before its first load
    assert spec.id == REPO
    assert unsynced_marker(blob).exists()
    assert spec.check is not None
    assert spec.check()
    assert not unsynced_marker(blob).exists()
    assert after.lookup(REPO, REPO) is not None
    assert sum(hub.stats.requests.values()) == requests  # no network

    unsynced_marker(blob).touch()  # lost: the file's size survived, its data did not
    blob.write_bytes(bytes(4 * MiB))
    after = ModelCache(tmp_path / "cache", shared=[])
    (spec,) = pulled_specs(after)
    assert spec.check is not None
    assert not spec.check()  # so its first load fails (see the server test below)
    assert after.lookup(REPO, REPO) is None
    assert not blob.exists()
    assert not unsynced_marker(blob).exists()
    again = Puller(after, fast_tuning())
    model = await again.pull(parse_ref(REPO))
    await again.durable()
    assert sum(hub.stats.requests.values()) > requests  # fetched again
    assert sha256_of(after.snapshot_path(REPO, model.commit, model.files[0].path)) == sha
    assert not unsynced_marker(blob).exists()


@pytest.mark.parametrize(
    ("switch", "value", "count_attr"),
    [
        ("drop_after_bytes", 300 * 1024, "drops"),
        ("stall_after_bytes", 300 * 1024, "stalls"),
        ("fail_5xx", 3, None),
    ],
)
async def test_recovers_from_drops_stalls_and_server_errors(
    hub: FakeHub, tmp_path: Path, switch: str, value: int, count_attr: str | None
) -> None:
    sha = add_big(hub, "model-Q4_K_M.gguf", 8 * MiB, seed=2)
    setattr(hub.switches, switch, value)
    if count_attr:
        setattr(hub.switches, count_attr, 3)
    puller = Puller(ModelCache(tmp_path / "cache", shared=[]), fast_tuning(stall_timeout=0.5))
    model = await puller.pull(parse_ref(REPO))
    assert model.files[0].blob == sha
    assert sum(c.retries for c in puller.counters) >= 1
    if switch == "stall_after_bytes":
        assert sum(c.stalls for c in puller.counters) >= 1


async def test_server_without_range_gets_a_single_stream(hub: FakeHub, tmp_path: Path) -> None:
    sha = add_big(hub, "model-Q4_K_M.gguf", 4 * MiB, seed=3)
    hub.switches.no_range = True
    puller = Puller(ModelCache(tmp_path / "cache", shared=[]), fast_tuning())
    model = await puller.pull(parse_ref(REPO))
    assert model.files[0].blob == sha
    assert puller.counters[0].single_stream


async def test_a_single_stream_that_drops_starts_over_and_still_verifies(
    hub: FakeHub, tmp_path: Path
) -> None:
    """Without Range a dropped stream restarts from byte 0, while the hash that runs beside
    the transfer has already read part of the first attempt; the result is still verified."""
    sha = add_big(hub, "model-Q4_K_M.gguf", 8 * MiB, seed=4)
    hub.switches.no_range = True
    hub.switches.drop_after_bytes = 5 * MiB  # after some blocks were hashed
    hub.switches.drops = 3  # the first GET is the Range probe, which reads no body
    puller = Puller(ModelCache(tmp_path / "cache", shared=[]), fast_tuning())
    model = await puller.pull(parse_ref(REPO))
    assert model.files[0].blob == sha
    assert puller.counters[0].single_stream
    assert puller.counters[0].retries == 2
    assert puller.counters[0].bytes_fetched == 8 * MiB + 2 * 5 * MiB


async def test_corrupted_data_is_rejected_and_deleted(hub: FakeHub, tmp_path: Path) -> None:
    add_big(hub, "model-Q4_K_M.gguf", 4 * MiB, seed=4)
    hub.switches.corrupt = True
    cache = ModelCache(tmp_path / "cache", shared=[])
    with pytest.raises(ChecksumMismatch, match="does not match the Hub's sha256"):
        await Puller(cache, fast_tuning()).pull(parse_ref(REPO))
    blobs = cache.repo_dir(REPO) / "blobs"
    assert not list(blobs.iterdir())  # no blob, no partial data, no state
    assert cache.lookup(REPO, REPO) is None


@pytest.mark.parametrize(
    "name", ["../../evil.gguf", "/etc/evil.gguf", "a/../../evil.gguf", "C:\\evil.gguf"]
)
async def test_hostile_listings_cannot_write_outside_the_cache(
    hub: FakeHub, tmp_path: Path, name: str
) -> None:
    add_big(hub, "model-Q4_K_M.gguf", 1 * MiB)
    hub.malicious_listing(REPO, [name])
    cache = ModelCache(tmp_path / "cache", shared=[])
    with pytest.raises(BadRequest) as excinfo:
        await Puller(cache, fast_tuning()).pull(parse_ref(REPO))
    assert excinfo.value.code == "unsafe_path"
    assert files_under(tmp_path) <= {p for p in files_under(tmp_path) if p.startswith("cache/")}
    assert not (tmp_path.parent / "evil.gguf").exists()


async def test_huggingface_hub_cache_interop(hub: FakeHub, tmp_path: Path) -> None:
    from huggingface_hub import hf_hub_download

    sha = add_big(hub, "model-Q4_K_M.gguf", 3 * MiB, seed=5)
    theirs = tmp_path / "hf-cache"
    path = await asyncio.to_thread(
        hf_hub_download, REPO, "model-Q4_K_M.gguf", cache_dir=theirs, endpoint=hub.endpoint
    )
    assert sha256_of(Path(path)) == sha
    cdn_bytes = hub.stats.bytes_sent
    cache = ModelCache(tmp_path / "ours", shared=[theirs])
    await Puller(cache, fast_tuning()).pull(parse_ref(REPO))
    assert hub.stats.bytes_sent == cdn_bytes  # their blob was reused, not downloaded again

    def no_hard_links(src: object, dst: object) -> None:
        raise OSError("another file system")

    with pytest.MonkeyPatch.context() as patch:  # across file systems: a copy, made whole
        patch.setattr(os, "link", no_hard_links)
        copied = ModelCache(tmp_path / "copied", shared=[theirs])
        await Puller(copied, fast_tuning()).pull(parse_ref(REPO))
    assert hub.stats.bytes_sent == cdn_bytes
    blob = copied.blob_path(REPO, sha)
    assert not blob.is_symlink()
    assert blob.stat().st_ino != os.stat(path).st_ino  # not a hard link of theirs
    assert sha256_of(blob) == sha
    assert sorted(p.name for p in blob.parent.iterdir()) == [sha]  # no temporary name, no marker

    other = ModelCache(tmp_path / "fresh", shared=[])
    await Puller(other, fast_tuning()).pull(parse_ref(REPO))
    found = await asyncio.to_thread(
        hf_hub_download, REPO, "model-Q4_K_M.gguf", cache_dir=other.root, local_files_only=True
    )
    assert sha256_of(Path(found)) == sha


async def test_budget_evicts_least_recently_used_but_never_protected(
    hub: FakeHub, tmp_path: Path
) -> None:
    for quant in ("Q4_K_M", "Q8_0", "Q6_K"):
        add_big(hub, f"model-{quant}.gguf", 2 * MiB, seed=len(quant))
    cache = ModelCache(tmp_path / "cache", shared=[])
    puller = Puller(cache, fast_tuning())
    for quant in ("Q4_K_M", "Q8_0", "Q6_K"):
        await puller.pull(parse_ref(f"{REPO}:{quant}"))
        await asyncio.sleep(0.01)
    evicted = cache.enforce_budget(int(4.5 * MiB), protected={f"{REPO}:Q4_K_M"})
    assert evicted == [f"{REPO}:Q8_0"]  # the oldest, Q4_K_M, is loaded (protected)
    assert {m.ref for m in cache.models()} == {f"{REPO}:Q4_K_M", f"{REPO}:Q6_K"}


async def _cli(*args: str, env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        SERVER_BIN, "models", *args, env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def test_resume_after_kill_9_of_the_cli_refetches_little(
    hub: FakeHub, tmp_path: Path
) -> None:
    size = 32 * MiB
    sha = add_big(hub, "model-Q4_K_M.gguf", size, seed=6)
    hub.switches.bytes_per_second = MiB / 2  # per connection: 16 connections take ~4 s
    env = {"HF_ENDPOINT": hub.endpoint, "TABAGENT_MODEL_CACHE_PATH": str(tmp_path / "cache")}
    proc = await _cli("pull", REPO, env=env)
    state = tmp_path / "cache" / f"models--{REPO.replace('/', '--')}" / "blobs"
    state_file = state / f"{sha}.tabagent-parts.json"
    while True:  # until about half is on disk, by the saved part state
        await asyncio.sleep(0.05)
        if state_file.exists():
            with_state = json.loads(state_file.read_text())
            if sum(p[2] for p in with_state["parts"]) >= size // 2:
                break
        assert proc.returncode is None, "the pull finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    sent_before = hub.stats.bytes_sent
    hub.switches.bytes_per_second = None
    again = await _cli("pull", REPO, env=env)
    out, err = await again.communicate()
    assert again.returncode == 0, err.decode()
    refetched = hub.stats.bytes_sent - sent_before
    on_disk_at_kill = sum(p[2] for p in with_state["parts"])
    assert refetched <= size - on_disk_at_kill + size * 0.05
    assert sha256_of(Path(out.decode().split()[-1])) == sha


async def test_cli_list_rm_gc(hub: FakeHub, tmp_path: Path) -> None:
    add_big(hub, "model-Q4_K_M.gguf", 1 * MiB, seed=7)
    env = {"HF_ENDPOINT": hub.endpoint, "TABAGENT_MODEL_CACHE_PATH": str(tmp_path / "cache")}
    pull = await _cli("pull", REPO, env=env)
    _, err = await pull.communicate()
    assert pull.returncode == 0
    bars = {line.split()[0]: line.split()[2] for line in err.decode().splitlines() if "━" in line}
    assert bars == {"total": "1.0/1.0", "model-Q4_K_M.gguf": "1.0/1.0"}  # MB, per file too
    again = await _cli("pull", REPO, env=env)
    _, err = await again.communicate()
    assert b"already in the cache (no network)" in err
    listing = await _cli("list", "--json", env=env)
    out, _ = await listing.communicate()
    rows = json.loads(out)
    assert [(r["model"], r["size_bytes"], r["loaded"]) for r in rows] == [(REPO, 1 * MiB, None)]
    stray = tmp_path / "cache" / f"models--{REPO.replace('/', '--')}" / "blobs" / ("0" * 64)
    stray.write_bytes(b"x" * 100)
    orphan = stray.with_name("1" * 64 + UNSYNCED_SUFFIX)  # the marker of a download long gone
    orphan.touch()
    os.utime(orphan, (0, 0))
    starting = stray.with_name("2" * 64 + UNSYNCED_SUFFIX)  # a download about to write its data
    starting.touch()
    gc = await _cli("gc", env=env)
    out, _ = await gc.communicate()
    assert b"freed 100 B" in out
    assert not stray.exists()
    assert not orphan.exists()
    assert starting.exists()
    rm = await _cli("rm", REPO, env=env)
    await rm.communicate()
    assert rm.returncode == 0
    listing = await _cli("list", "--json", env=env)
    out, _ = await listing.communicate()
    assert json.loads(out) == []


async def test_a_write_failure_is_clear_and_leaves_nothing_that_looks_whole(
    hub: FakeHub, tmp_path: Path
) -> None:
    import resource

    add_big(hub, "model-Q4_K_M.gguf", 4 * MiB, seed=8)
    env = {"HF_ENDPOINT": hub.endpoint, "TABAGENT_MODEL_CACHE_PATH": str(tmp_path / "cache")}

    def small_files() -> None:  # the disk "fills up" at 1 MiB
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 * MiB, 1 * MiB))

    proc = await asyncio.create_subprocess_exec(
        SERVER_BIN, "models", "pull", REPO, env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, preexec_fn=small_files,
    )  # fmt: skip
    _, err = await proc.communicate()
    assert proc.returncode == 1
    assert b"cannot write" in err or b"disk space" in err
    blobs = tmp_path / "cache" / f"models--{REPO.replace('/', '--')}" / "blobs"
    assert not blobs.exists() or not any(blobs.iterdir())
    assert sys.platform.startswith("linux")


async def test_pull_over_http_streams_progress_then_chat_uses_the_model(
    hub: FakeHub, tmp_path: Path
) -> None:
    import aiohttp

    from ml_service.backends.llama import smollm2_path
    from tests.helpers import running_server

    gguf = await asyncio.to_thread(Path(smollm2_path()).read_bytes)
    hub.add_repo("test-org/SmolLM2-135M-Instruct-GGUF", {"SmolLM2-135M-Instruct.Q4_1.gguf": gguf})
    ref = "test-org/SmolLM2-135M-Instruct-GGUF:Q4_1"
    env = {"HF_ENDPOINT": hub.endpoint, "TABAGENT_MODEL_CACHE_PATH": str(tmp_path / "cache")}
    with running_server(("--mode", "http"), env=env, log_dir=tmp_path) as server:
        async with aiohttp.ClientSession(server.base_url) as http:
            events = []
            async with http.post("/v1/models/pull", json={"model": ref}) as response:
                assert response.status == 200
                async for raw in response.content:
                    line = raw.decode().strip()
                    if line.startswith("event: "):
                        events.append([line[7:], None])
                    elif line.startswith("data: "):
                        events[-1][1] = json.loads(line[6:])
            names = [name for name, _ in events]
            assert names[0] == "progress"
            assert names[-1] == "done"
            done = events[-1][1]
            assert done["model"]["id"] == ref
            assert done["model"]["kind"] == "chat"
            assert done["cached"] is False
            progress = [data for name, data in events if name == "progress"]
            assert progress[-1]["total"] == len(gguf)
            files = [data for data in progress if data["status"] == "file_done"]
            assert [(f["file"], f["file_completed"], f["file_total"]) for f in files] == [
                ("SmolLM2-135M-Instruct.Q4_1.gguf", len(gguf), len(gguf))
            ]

            async with http.get("/v1/models") as response:
                ids = [m["id"] for m in (await response.json())["data"]]
            assert ref in ids
            async with http.get("/metrics") as response:
                metrics = await response.text()
            fetched = next(
                line.split()[1]
                for line in metrics.splitlines()
                if line.startswith("tabagent_download_bytes_total ")
            )
            assert float(fetched) == len(gguf)
            assert "tabagent_download_speed_bytes_per_second_count 1.0" in metrics
            chat = {
                "model": ref,
                "temperature": 0,
                "max_tokens": 20,
                "messages": [
                    {"role": "system", "content": "You are a helpful assistant. Answer concisely."},
                    {"role": "user", "content": "What is the capital of France?"},
                ],
            }
            async with http.post("/v1/chat/completions", json=chat) as response:
                reply = await response.json()
            assert response.status == 200, reply
            assert "Paris" in reply["choices"][0]["message"]["content"]
            assert reply["model"] == ref
            listing = await _cli("list", "--json", env=env)  # finds this server, asks it
            out, _ = await listing.communicate()
            assert [(r["model"], r["loaded"]) for r in json.loads(out)] == [(ref, True)]

            async with http.post("/v1/models/pull", json={"model": "../etc/passwd"}) as response:
                assert response.status == 400
                assert (await response.json())["error"]["code"] == "bad_model_ref"


async def test_a_model_a_crash_left_unflushed_is_served_at_once_and_checked_at_first_use(
    hub: FakeHub, tmp_path: Path
) -> None:
    """After a crash the server starts without hashing pulled models: one whose flush was cut
    short is listed at once and hashed before its first load. Intact, it chats; lost, the chat
    gets a clear 404 that says to pull it again, and the model leaves the list."""
    import aiohttp

    from ml_service.backends.llama import smollm2_path
    from tests.helpers import running_server

    gguf = await asyncio.to_thread(Path(smollm2_path()).read_bytes)
    repo = "test-org/SmolLM2-135M-Instruct-GGUF"
    hub.add_repo(repo, {"SmolLM2-135M-Instruct.Q4_1.gguf": gguf})
    ref = f"{repo}:Q4_1"
    cache = ModelCache(tmp_path / "cache", shared=[])
    puller = Puller(cache, fast_tuning())
    model = await puller.pull(parse_ref(ref))
    await puller.durable()
    blob = cache.blob_path(repo, model.files[0].blob)
    env = {"HF_ENDPOINT": hub.endpoint, "TABAGENT_MODEL_CACHE_PATH": str(cache.root)}
    chat = {"model": ref, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}

    async def listed(http: aiohttp.ClientSession) -> list[str]:
        async with http.get("/v1/models") as response:
            return [m["id"] for m in (await response.json())["data"]]

    unsynced_marker(blob).touch()  # intact data, as when the crash came after the flush
    with running_server(("--mode", "http"), env=env, log_dir=tmp_path) as server:
        async with aiohttp.ClientSession(server.base_url) as http:
            assert ref in await listed(http)
            assert unsynced_marker(blob).exists()  # not hashed to start
            async with http.post("/v1/chat/completions", json=chat) as response:
                assert response.status == 200, await response.text()
    assert not unsynced_marker(blob).exists()

    unsynced_marker(blob).touch()  # lost: the size survived, the data did not
    blob.write_bytes(bytes(len(gguf)))
    with running_server(("--mode", "http"), env=env, log_dir=tmp_path) as server:
        async with aiohttp.ClientSession(server.base_url) as http:
            assert ref in await listed(http)
            async with http.post("/v1/chat/completions", json=chat) as response:
                error = (await response.json())["error"]
            assert response.status == 404
            assert error["code"] == "model_lost"
            assert f"tabagent-server models pull {ref}" in error["message"]
            assert ref not in await listed(http)
            async with http.get("/v1/health") as response:
                assert (await response.json())["components"]["ml_worker"]["state"] == "ok"
    assert not blob.exists()


async def test_a_pulled_onnx_embedding_model_serves_embeddings(
    hub: FakeHub, tmp_path: Path
) -> None:
    """Publish our own ONNX export of MiniLM on the fake Hub, pull it, and compare its vectors
    with the built-in model's: the same weights must give the same embeddings."""
    import aiohttp
    import numpy as np

    from ml_service.backends.onnx_embed import ensure_onnx
    from tabagent.ml.orchestrator import embedded_models
    from tests.helpers import running_server

    folder = Path(next(s.path for s in embedded_models() if s.kind == "embedding"))
    onnx = await asyncio.to_thread(ensure_onnx, folder, tmp_path / "export")
    names = ["config.json", "tokenizer.json", "modules.json", "1_Pooling/config.json"]
    files = {name: (folder / name).read_bytes() for name in names}
    files["onnx/model.onnx"] = await asyncio.to_thread(onnx.read_bytes)
    files["README.md"] = b"an ONNX export\n"
    hub.add_repo("test-org/minilm-onnx", files)
    env = {"HF_ENDPOINT": hub.endpoint, "TABAGENT_MODEL_CACHE_PATH": str(tmp_path / "cache")}
    with running_server(("--mode", "http"), env=env, log_dir=tmp_path) as server:
        async with aiohttp.ClientSession(server.base_url) as http:
            async with http.post("/v1/models/pull", json={"model": "test-org/minilm-onnx"}) as r:
                body = await r.text()
            assert r.status == 200
            assert '"kind":"embedding"' in body.replace(" ", "")
            texts = ["My dog's name is Rex", "The stock market fell today"]
            vectors = {}
            for model in ("test-org/minilm-onnx", "all-minilm-l6-v2"):
                async with http.post("/v1/embeddings", json={"model": model, "input": texts}) as r:
                    reply = await r.json()
                assert r.status == 200, reply
                vectors[model] = np.array([d["embedding"] for d in reply["data"]])
    np.testing.assert_allclose(
        vectors["test-org/minilm-onnx"], vectors["all-minilm-l6-v2"], atol=1e-5
    )
