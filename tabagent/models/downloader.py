"""The parallel, resumable, verified downloader: one file over many HTTP Range requests.

Design (why it beats a fixed N-part split such as Ollama's 16 parts):

* **Small parts, a shared queue, work stealing.** The file is cut into parts of a few MiB that
  ``connections`` workers take in order over keep-alive connections. When the queue is empty,
  an idle worker splits the biggest part still in flight and takes its second half, so one slow
  connection never holds the tail of the download.
* **Stall and error recovery.** Every read has a deadline; a stalled or broken connection is
  dropped and the part resumes from its last written byte, with backoff, up to a retry limit.
* **Resume across runs.** Data goes to ``<blob>.tabagent-partial`` (pre-allocated, so a full
  disk fails at once) and the progress of every part to ``<blob>.tabagent-parts.json``, written
  atomically after every 4 MiB. A killed process resumes from the bytes already on disk.
* **Verification without a second pass.** The sha256 follows the contiguous prefix of the file
  while parts land (from the page cache, overlapped with the network); when the last part is
  in, only the tail is left to hash. A mismatch deletes the data and says so.
* **Visible only when whole, durable soon after.** The blob appears under its final name by an
  atomic rename, after verification, and is usable at once. Its flush to the disk (fsync)
  comes after, off the critical path: :func:`make_durable`, which the caller runs in the
  background. Until then ``<blob>.tabagent-unsynced`` sits beside the blob (made durable before
  the first byte is written); a blob found with one after a crash or a power cut is hashed again
  before use (``ModelCache.settle``), so data the disk lost is never served as whole.
* **Fallback.** A server that ignores ``Range`` (200 instead of 206) gets one plain stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import logging
import mmap
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from tabagent.errors import BadRequest, ChecksumMismatch, DiskError, DownloadError, TabAgentError

log = logging.getLogger(__name__)

MiB = 1024 * 1024
PARTIAL_SUFFIX = ".tabagent-partial"
STATE_SUFFIX = ".tabagent-parts.json"
UNSYNCED_SUFFIX = ".tabagent-unsynced"  # beside a blob whose data may not be on the disk yet
_WRITE_BLOCK = 512 * 1024  # reads are gathered into writes of this size
_MAX_IOV = 64  # reads per gathered write, well under every platform's IOV_MAX
# The part state is saved after this much new data (or this long): a killed process re-fetches
# at most about this much.
_STATE_EVERY_BYTES = 4 * MiB
# Written data is flushed to the disk in the background every this many bytes, so the fsync
# after the download has little left to do and dirty pages never pile up.
_FLUSH_EVERY_BYTES = 64 * MiB
_STATE_EVERY = 0.5


@dataclass(frozen=True)
class RemoteFile:
    url: str
    size: int
    sha256: str | None  # the Hub's LFS sha256; None for small git files (checked by size)
    name: str = ""


@dataclass
class Tuning:
    connections: int = 16  # at most; the download starts with fewer and adds while they pay
    initial_connections: int = 4
    ramp_interval: float = 0.25  # seconds to settle, then seconds to measure, per step
    ramp_gain: float = 0.1  # a step of connections must raise the rate by this much to stay
    min_part: int = 4 * MiB
    max_part: int = 64 * MiB
    stall_timeout: float = 10.0
    max_retries: int = 8
    backoff: float = 0.25


@dataclass
class _Part:
    start: int
    end: int  # exclusive; lowered when another worker steals the tail
    done: int = 0  # bytes written from start
    active: bool = False

    @property
    def pos(self) -> int:
        return self.start + self.done

    @property
    def remaining(self) -> int:
        return self.end - self.pos


@dataclass
class Counters:
    """What one download did (also fed to Prometheus by the caller)."""

    bytes_fetched: int = 0
    retries: int = 0
    stalls: int = 0
    requests: int = 0
    resumed_bytes: int = 0
    single_stream: bool = False
    connections: int = 0  # the most parallel connections used at once
    seconds: float = 0.0


ProgressFn = Callable[[int, int], None]  # (bytes on disk, total)


def plan_parts(size: int, tuning: Tuning) -> list[_Part]:
    """Parts of equal size: about four per connection, within [min_part, max_part]."""
    if size == 0:
        return []
    target = size // max(1, tuning.connections * 4)
    part = max(tuning.min_part, min(tuning.max_part, target))
    return [_Part(start, min(start + part, size)) for start in range(0, size, part)]


class _Download:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        remote: RemoteFile,
        dest: Path,
        tuning: Tuning,
        headers: dict[str, str],
        progress: ProgressFn | None,
    ) -> None:
        self.session, self.remote, self.dest, self.tuning = session, remote, dest, tuning
        self.headers = headers
        self.progress = progress
        self.partial = dest.with_name(dest.name + PARTIAL_SUFFIX)
        self.state_path = dest.with_name(dest.name + STATE_SUFFIX)
        self.counters = Counters()
        self.parts: list[_Part] = []
        self._live = 0  # workers running
        self._retire = 0  # workers asked to stop at their next part
        self.url = remote.url  # becomes the CDN address after the first redirect
        self.fd = -1
        self._hasher = hashlib.sha256()
        self._hashed = 0
        self._advanced = asyncio.Event()  # set by each write: the hashable prefix may have grown
        self._hashing = asyncio.Lock()  # held while a block is hashed; a restart waits for it
        self._last_state = 0.0
        self._state_bytes = 0
        self._written = 0  # bytes on disk, kept as a running total (summing parts per chunk costs)
        self._flushed = 0
        self._background: set[asyncio.Future[None]] = set()
        self._saving: asyncio.Future[None] | None = None

    # ---- state on disk ----

    def _load_state(self) -> bool:
        try:
            state = json.loads(self.state_path.read_text())
            if state["size"] != self.remote.size or state.get("sha256") != self.remote.sha256:
                return False
            if self.partial.stat().st_size != self.remote.size:
                return False
            self.parts = [_Part(p[0], p[1], p[2]) for p in state["parts"]]
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            return False
        covered = sorted((p.start, p.end) for p in self.parts)
        expected = 0
        for start, end in covered:  # the parts must tile the file exactly
            if start != expected or not start < end:
                return False
            expected = end
        return expected == self.remote.size

    def _in_background(self, fn: Callable[..., None], *args: object) -> asyncio.Future[None]:
        future = asyncio.get_running_loop().run_in_executor(None, fn, *args)
        self._background.add(future)
        future.add_done_callback(self._background.discard)
        return future

    def _save_state(self, force: bool = False) -> None:
        now = time.monotonic()
        on_disk = self._on_disk()
        recent = on_disk - self._state_bytes < _STATE_EVERY_BYTES
        if not force and recent and now - self._last_state < _STATE_EVERY:
            return
        self._last_state, self._state_bytes = now, on_disk
        # No fsync: a killed process loses nothing from the page cache, and after a power cut
        # the final sha256 check catches whatever the state promised but the disk lost.
        state = json.dumps(
            {
                "size": self.remote.size,
                "sha256": self.remote.sha256,
                "parts": [[p.start, p.end, p.done] for p in self.parts],
            }
        )
        if force:
            self._write_state(state)
        elif self._saving is None or self._saving.done():  # one save at a time, off the loop
            self._saving = self._in_background(self._write_state, state)

    def _write_state(self, state: str) -> None:
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        tmp.write_text(state)
        os.replace(tmp, self.state_path)

    def _on_disk(self) -> int:
        return self._written

    # ---- hashing the contiguous prefix ----

    def _prefix(self) -> int:
        prefix = 0
        for part in sorted(self.parts, key=lambda p: p.start):
            if part.start != prefix:
                break
            prefix = part.pos
            if part.remaining > 0:
                break
        return prefix

    async def _hash_upto(self, limit: int) -> None:
        while self._hashed < limit:
            async with self._hashing:
                count = min(8 * MiB, limit - self._hashed)
                hashed = await asyncio.to_thread(self._hash_block, self._hashed, count)
                if not hashed:
                    raise DownloadError(f"{self.remote.name}: short read while verifying")
                self._hashed += hashed

    async def _restart_hash(self) -> None:
        """Hash from byte 0 again (a stream without Range restarts), once no block is hashing."""
        async with self._hashing:
            self._hasher, self._hashed = hashlib.sha256(), 0

    def _hash_block(self, offset: int, count: int) -> int:
        """Hash one block of what is on the disk, off the event loop (hashlib releases the
        GIL). The block is mapped, not read: hashing the page cache in place saves a copy of
        every byte, which on a CPU-bound download is a tenth of its time."""
        if count <= 0 or os.fstat(self.fd).st_size < offset + count:
            data = os.pread(self.fd, count, offset)  # cut short: the caller reports it
            self._hasher.update(data)
            return len(data)
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        with (
            mmap.mmap(self.fd, offset + count - start, access=mmap.ACCESS_READ, offset=start) as m,
            memoryview(m) as view,
        ):
            self._hasher.update(view[offset - start :])
        return count

    async def _hash_follower(self, done: asyncio.Event) -> None:
        """Hash the file's contiguous prefix while the rest downloads, as soon as it grows:
        what is still unhashed when the transfer ends is hashed after it, on the clock."""
        while True:
            limit = self._prefix()
            if limit > self._hashed:
                await self._hash_upto(limit)
                continue
            if done.is_set():
                return
            self._advanced.clear()
            await self._advanced.wait()

    # ---- the transfer ----

    async def run(self) -> Counters:
        started = time.monotonic()
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        resumed = self._load_state()
        if not resumed:
            self.partial.unlink(missing_ok=True)
            self.parts = plan_parts(self.remote.size, self.tuning)
        self._written = sum(p.done for p in self.parts)
        self.counters.resumed_bytes = self._written
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_BINARY", 0)
        try:
            await asyncio.to_thread(_mark_unsynced, self.dest)  # syncs a folder: off the loop
        except OSError as exc:  # the data of an earlier attempt stays, to resume later
            raise _disk_error(
                exc, unsynced_marker(self.dest), self.remote.size, data=False
            ) from None
        try:
            self.fd = os.open(self.partial, flags, 0o644)
            if not resumed:
                _preallocate(self.fd, self.remote.size, self.partial)
        except OSError as exc:
            raise _disk_error(exc, self.partial, self.remote.size) from None
        try:
            if self.remote.size:
                await self._transfer()
            await self._hash_upto(self.remote.size)
            self._verify()
        except (ChecksumMismatch, DiskError):
            raise  # nothing worth resuming: the data was deleted
        except BaseException:
            if self.fd >= 0 and self.parts:
                with contextlib.suppress(OSError):
                    self._save_state(force=True)  # Ctrl-C, kill, errors: resumable
            raise
        finally:
            if self._background:  # a state save or flush still running on this descriptor
                await asyncio.gather(*self._background, return_exceptions=True)
            os.close(self.fd)
        os.replace(self.partial, self.dest)  # usable now; durable once make_durable has run
        self.state_path.unlink(missing_ok=True)
        self.counters.seconds = time.monotonic() - started
        return self.counters

    def _verify(self) -> None:
        if self.remote.sha256 is None:
            return
        actual = self._hasher.hexdigest()
        if actual != self.remote.sha256.lower():
            self.partial.unlink(missing_ok=True)
            self.state_path.unlink(missing_ok=True)
            unsynced_marker(self.dest).unlink(missing_ok=True)
            raise ChecksumMismatch(
                f"{self.remote.name}: the downloaded data does not match the Hub's sha256 "
                f"(expected {self.remote.sha256[:12]}…, got {actual[:12]}…); it was deleted, "
                "try again"
            )

    async def _transfer(self) -> None:
        done = asyncio.Event()
        hasher = asyncio.create_task(self._hash_follower(done))
        try:
            if not await self._probe_ranges():
                await self._single_stream()
            else:
                await self._parallel()
        except* TabAgentError as group:
            raise group.exceptions[0] from None
        finally:
            done.set()
            self._advanced.set()
            await hasher
        if any(p.remaining for p in self.parts):
            raise DownloadError(f"{self.remote.name}: parts are missing after the transfer")

    async def _probe_ranges(self) -> bool:
        """Follow redirects once (to the CDN) and learn whether the server honours Range."""
        headers = {**self.headers, "Range": "bytes=0-0"}
        for attempt in range(self.tuning.max_retries + 1):
            try:
                async with self.session.get(self.url, headers=headers) as response:
                    self.counters.requests += 1
                    if response.status == 206:
                        self.url = str(response.url)
                        return True
                    if response.status == 200:
                        self.url = str(response.url)
                        return False
                    _raise_for_status(response.status, self.remote.name)
            except (aiohttp.ClientError, TimeoutError, _Retryable) as exc:
                await self._backoff(attempt, exc)
        raise DownloadError(f"{self.remote.name}: the server kept failing")

    async def _backoff(self, attempt: int, exc: BaseException) -> None:
        self.counters.retries += 1
        if attempt >= self.tuning.max_retries:
            raise DownloadError(f"{self.remote.name}: gave up after {attempt} retries: {exc}")
        delay = min(10.0, self.tuning.backoff * 2**attempt)
        log.info("%s: retry in %.2f s (%s)", self.remote.name, delay, exc)
        await asyncio.sleep(delay)

    async def _parallel(self) -> None:
        limit = min(self.tuning.connections, max(1, len(self.parts)))
        ramp: asyncio.Task[None] | None = None
        try:
            async with asyncio.TaskGroup() as group:
                self._start_workers(group, min(limit, max(1, self.tuning.initial_connections)))
                if self._live < limit:
                    ramp = asyncio.create_task(self._ramp(group, limit))
        finally:
            if ramp is not None:
                ramp.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ramp

    def _start_workers(self, group: asyncio.TaskGroup, count: int) -> None:
        for _ in range(count):
            self._live += 1
            self.counters.connections = max(self.counters.connections, self._live)
            group.create_task(self._worker())

    async def _ramp(self, group: asyncio.TaskGroup, limit: int) -> None:
        """Add connections while they add speed, a step at a time.

        A link capped per connection (many CDNs) gets up to ``limit``; one that is already full,
        or a client that is CPU-bound (loopback), keeps few: more would only park data in socket
        buffers, which a killed download then fetches again. A step that does not raise the
        rate by ``ramp_gain`` is taken back (its workers stop at their next part)."""
        step, interval = max(1, self.tuning.initial_connections), self.tuning.ramp_interval
        best = 0.0
        while self._live:
            await asyncio.sleep(interval)  # the connections just opened get going
            before, start = self.counters.bytes_fetched, time.monotonic()
            await asyncio.sleep(interval)
            rate = (self.counters.bytes_fetched - before) / (time.monotonic() - start)
            if best and rate < best * (1 + self.tuning.ramp_gain):
                self._retire += step
                return
            best = rate
            if not self._live or self._live >= limit or not self._unassigned():
                return
            step = min(step, limit - self._live)
            self._start_workers(group, step)

    def _unassigned(self) -> bool:
        """Whether a new worker would find work (a free part, or one worth splitting)."""
        floor = 2 * self.tuning.min_part
        return any(p.remaining > 0 and (not p.active or p.remaining >= floor) for p in self.parts)

    def _next_part(self) -> _Part | None:
        if self._retire > 0:  # a step of connections that did not pay: this one stops
            self._retire -= 1
            return None
        for part in self.parts:
            if not part.active and part.remaining > 0:
                part.active = True
                return part
        # steal: split the in-flight part with the most left, if it is worth it
        busy = [p for p in self.parts if p.active and p.remaining >= 2 * self.tuning.min_part]
        if not busy:
            return None
        victim = max(busy, key=lambda p: p.remaining)
        middle = victim.pos + victim.remaining // 2
        stolen = _Part(middle, victim.end, active=True)
        victim.end = middle
        self.parts.append(stolen)
        return stolen

    async def _worker(self) -> None:
        try:
            while (part := self._next_part()) is not None:
                attempt = 0
                while part.remaining > 0:
                    try:
                        await self._fetch_part(part)
                        attempt = 0
                    except (aiohttp.ClientError, TimeoutError, _Retryable) as exc:
                        await self._backoff(attempt, exc)
                        attempt += 1
                part.active = False
        finally:
            self._live -= 1

    async def _fetch_part(self, part: _Part) -> None:
        headers = {**self.headers, "Range": f"bytes={part.pos}-{part.end - 1}"}
        # sock_read: a connection that sends nothing for stall_timeout is a stall
        timeout = aiohttp.ClientTimeout(total=None, sock_read=self.tuning.stall_timeout)
        # The reads are kept as they arrive and written with one gathered write (pwritev), so
        # each byte is copied once in Python's hands, not once more into a joined buffer.
        reads: list[bytes] = []
        pending = 0
        try:
            async with self.session.get(self.url, headers=headers, timeout=timeout) as response:
                self.counters.requests += 1
                if response.status != 206:
                    _raise_for_status(response.status, self.remote.name)
                    raise _Retryable(f"expected 206, got {response.status}")
                while part.remaining - pending > 0:
                    data, chunk_end = await response.content.readchunk()  # as received
                    if not data:
                        if chunk_end:  # the end of a chunk of a chunked response: go on
                            continue
                        raise _Retryable("connection closed mid-part")
                    reads.append(data)
                    pending += len(data)
                    if (
                        pending >= _WRITE_BLOCK
                        or pending >= part.remaining
                        or len(reads) >= _MAX_IOV
                    ):
                        await self._commit(part, reads)
                        reads, pending = [], 0
        except aiohttp.ServerTimeoutError:
            self.counters.stalls += 1
            raise _Retryable(f"stalled for {self.tuning.stall_timeout:.0f} s") from None
        finally:
            if reads:  # keep what arrived before a failure
                await self._commit(part, reads)

    async def _commit(self, part: _Part, reads: list[bytes]) -> None:
        chunks = _take(reads, part.remaining)  # a stolen tail may have shortened this part
        if not chunks:
            return
        # written in a thread: the event loop keeps reading the other connections meanwhile
        count = await asyncio.to_thread(self._write_gathered, chunks, part.pos)
        part.done += count
        self._written += count
        self.counters.bytes_fetched += count
        self._report()

    async def _single_stream(self) -> None:
        self.counters.single_stream = True
        self.parts = [_Part(0, self.remote.size, active=True)]
        for attempt in range(self.tuning.max_retries + 1):
            # no Range: every attempt restarts from byte 0, and so does the hash
            self.parts[0].done = self._written = 0
            await self._restart_hash()
            try:
                async with self.session.get(self.url, headers=self.headers) as response:
                    self.counters.requests += 1
                    _raise_for_status(response.status, self.remote.name)
                    async for data in response.content.iter_chunked(_WRITE_BLOCK):
                        part = self.parts[0]
                        data = data[: part.remaining]
                        self._write(data, part.pos)
                        part.done += len(data)
                        self._written += len(data)
                        self.counters.bytes_fetched += len(data)
                        self._report()
                if self.parts[0].remaining == 0:
                    return
                raise _Retryable("the stream ended early")
            except (aiohttp.ClientError, TimeoutError, _Retryable) as exc:
                await self._backoff(attempt, exc)

    def _write(self, data: bytes | memoryview, offset: int) -> None:
        try:
            view = memoryview(data)
            while view:
                written = os.pwrite(self.fd, view, offset)
                view, offset = view[written:], offset + written
        except OSError as exc:
            raise _disk_error(exc, self.partial, self.remote.size) from None

    def _write_gathered(self, chunks: list[memoryview], offset: int) -> int:
        """Write ``chunks`` back to back from ``offset``; returns the bytes written."""
        total = sum(len(c) for c in chunks)
        if not hasattr(os, "pwritev"):  # Windows
            self._write(b"".join(chunks), offset)
            return total
        try:
            while chunks:
                written = os.pwritev(self.fd, chunks, offset)
                offset += written
                while chunks and written >= len(chunks[0]):  # drop what is fully written
                    written -= len(chunks[0])
                    chunks = chunks[1:]
                if written:
                    chunks = [chunks[0][written:], *chunks[1:]]
        except OSError as exc:
            raise _disk_error(exc, self.partial, self.remote.size) from None
        return total

    def _report(self) -> None:
        """After each write: wake the hash follower, save the part state, flush, report."""
        self._advanced.set()
        self._save_state()
        if self._written - self._flushed >= _FLUSH_EVERY_BYTES:
            self._flushed = self._written
            self._in_background(os.fdatasync, self.fd)
        if self.progress is not None:
            self.progress(self._on_disk(), self.remote.size)


class _Retryable(Exception):
    """A transient failure: retry the part from its last written byte."""


def _take(reads: list[bytes], limit: int) -> list[memoryview]:
    """The first ``limit`` bytes of ``reads`` (views, nothing copied)."""
    out: list[memoryview] = []
    for data in reads:
        if limit <= 0:
            break
        view = memoryview(data)[:limit]
        out.append(view)
        limit -= len(view)
    return out


def _raise_for_status(status: int, name: str) -> None:
    if status in (200, 206):
        return
    if status in (408, 429) or status >= 500:
        raise _Retryable(f"HTTP {status}")
    if status in (401, 403):
        raise BadRequest(
            f"{name}: access denied (HTTP {status}); a gated or private model needs HF_TOKEN",
            code="hub_access_denied",
        )
    if status == 404:
        raise BadRequest(f"{name}: not found on the Hub", code="file_not_found")
    raise DownloadError(f"{name}: HTTP {status}")


def _preallocate(fd: int, size: int, path: Path) -> None:
    if size == 0:
        return
    if hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, 0, size)
            return
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
    os.ftruncate(fd, size)


def _disk_error(exc: OSError, path: Path, size: int, *, data: bool = True) -> TabAgentError:
    """The clear error for a failed write to ``path``; when ``path`` is a download's data, that
    data, its part state and its marker are deleted first (nothing that could look whole)."""
    if data:
        blob = path.name.removesuffix(PARTIAL_SUFFIX)
        leftovers = (path, *(path.with_name(blob + s) for s in (STATE_SUFFIX, UNSYNCED_SUFFIX)))
        for leftover in leftovers:
            with contextlib.suppress(OSError):
                leftover.unlink(missing_ok=True)
    if exc.errno == errno.ENOSPC:
        return DiskError(
            f"not enough disk space in {path.parent} for {size / MiB:.0f} MiB; "
            "free some space or set --model-cache-path elsewhere",
            code="disk_full",
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return DiskError(
            f"cannot write to {path.parent}: {exc.strerror}; check its permissions or set "
            "--model-cache-path",
            code="disk_permission",
        )
    return DiskError(f"cannot write {path}: {exc.strerror or exc}")


def unsynced_marker(blob: Path) -> Path:
    return blob.with_name(blob.name + UNSYNCED_SUFFIX)


def _mark_unsynced(dest: Path) -> None:
    """Say, durably and before any data is written, that ``dest`` is not yet on the disk.

    The folder is synced only here, while no data of ours is dirty, so it costs one small
    journal commit; the rename that later makes the blob visible cannot outlive this entry."""
    marker = unsynced_marker(dest)
    if marker.exists():
        return
    marker.touch()
    _sync_folder(dest.parent)


def _sync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError, AttributeError):  # not every platform syncs a folder
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def make_durable(blob: Path) -> None:
    """Flush a downloaded blob to the disk, then drop its unsynced marker (blocking)."""
    # POSIX syncs through any descriptor (the blob may be read-only); Windows only a writer's
    mode = os.O_RDWR | getattr(os, "O_BINARY", 0) if os.name == "nt" else os.O_RDONLY
    try:
        fd = os.open(blob, mode)
    except FileNotFoundError:  # removed meanwhile: nothing to make durable
        unsynced_marker(blob).unlink(missing_ok=True)
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    unsynced_marker(blob).unlink(missing_ok=True)


async def download(
    session: aiohttp.ClientSession,
    remote: RemoteFile,
    dest: Path,
    *,
    tuning: Tuning | None = None,
    headers: dict[str, str] | None = None,
    progress: ProgressFn | None = None,
) -> Counters:
    """Fetch ``remote`` into ``dest`` (atomically, verified); resumes a previous attempt.

    ``dest`` is usable on return; run :func:`make_durable` on it (in a thread) to flush it."""
    job = _Download(session, remote, dest, tuning or Tuning(), dict(headers or {}), progress)
    counters = await job.run()
    log.info(
        "%s: %.0f MiB in %.1f s over up to %d connections (%d requests, %d retries)",
        remote.name or dest.name, counters.bytes_fetched / MiB, counters.seconds,
        counters.connections, counters.requests, counters.retries,
    )  # fmt: skip
    return counters


def new_session(connections: int = 16, token: str | None = None) -> aiohttp.ClientSession:
    """A session for downloads: keep-alive connections, redirects followed, no total timeout."""
    connector = aiohttp.TCPConnector(limit=connections * 2, limit_per_host=connections)
    headers = {"User-Agent": "tabagent-downloader"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return aiohttp.ClientSession(
        connector=connector,
        headers=headers,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=30),
        auto_decompress=False,
        read_bufsize=512 * 1024,  # larger reads than the default; small enough to resume well
    )


__all__ = [
    "UNSYNCED_SUFFIX",
    "Counters",
    "RemoteFile",
    "Tuning",
    "download",
    "make_durable",
    "new_session",
    "plan_parts",
    "unsynced_marker",
]
