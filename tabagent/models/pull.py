"""Pull a model: resolve the reference on the Hub, fetch what is missing, link the snapshot.

Hub metadata (file list, sizes, LFS sha256, commit) comes from ``huggingface_hub``, pointed at
``HF_ENDPOINT`` (read at call time, so tests and mirrors work), authenticated with ``HF_TOKEN``,
and never contacted in offline mode (``HF_HUB_OFFLINE=1``) or when the pull is already complete
in the cache. The bytes come from our parallel downloader.
"""

from __future__ import annotations

import asyncio
import logging
import os
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tabagent.errors import BadRequest, NotFound, ServiceUnavailable
from tabagent.models.cache import CachedFile, CachedModel, ModelCache, blob_digest
from tabagent.models.downloader import (
    Counters,
    RemoteFile,
    Tuning,
    download,
    make_durable,
    new_session,
    unsynced_marker,
)
from tabagent.models.refs import ModelRef, choose_files, safe_relative_path

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"


@dataclass(frozen=True)
class PullEvent:
    kind: Literal["resolved", "progress", "file_done", "done"]
    ref: str
    file: str = ""
    done: int = 0  # bytes of the whole pull
    total: int = 0
    cached: bool = False
    file_done: int = 0  # bytes of ``file``
    file_total: int = 0


EventFn = Callable[[PullEvent], None]


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")


def hub_token() -> str | None:
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if token:
        return token
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # no stored token, unreadable token file
        return None


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class _Listing:
    commit: str
    files: dict[str, tuple[int, str | None, str]]  # path -> (size, lfs sha256, blob id)


def _model_info(ref: ModelRef, endpoint: str, token: str | None) -> _Listing:
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    # huggingface_hub freezes HF_HUB_OFFLINE at import; we decide from the environment now
    # (and only get here when online), so its request hook must agree.
    constants.HF_HUB_OFFLINE = False
    api = HfApi(endpoint=endpoint, token=token)
    try:
        info = api.model_info(ref.repo_id, revision=ref.revision, files_metadata=True)
    except GatedRepoError:
        raise BadRequest(
            f"{ref.repo_id} is gated: accept its terms on the Hub and set HF_TOKEN",
            code="hub_access_denied",
        ) from None
    except RepositoryNotFoundError:
        raise NotFound(
            f"{ref.repo_id} was not found on the Hub (or is private: set HF_TOKEN)",
            code="model_not_found",
        ) from None
    except RevisionNotFoundError:
        raise NotFound(
            f"{ref.repo_id} has no revision {ref.revision!r}", code="model_not_found"
        ) from None
    except HfHubHTTPError as exc:
        raise ServiceUnavailable(f"the Hub answered with an error: {exc}", retry_after=5) from None
    except OSError as exc:
        raise ServiceUnavailable(
            f"cannot reach the Hub at {endpoint}: {exc}", retry_after=5
        ) from None
    files: dict[str, tuple[int, str | None, str]] = {}
    for sibling in info.siblings or []:
        lfs = getattr(sibling, "lfs", None)
        sha256 = getattr(lfs, "sha256", None) if lfs is not None else None
        files[sibling.rfilename] = (int(sibling.size or 0), sha256, str(sibling.blob_id or ""))
    if not info.sha:
        raise ServiceUnavailable("the Hub did not say which commit it served", retry_after=5)
    return _Listing(commit=str(info.sha), files=files)


async def _check_git_blob(dest: Path, blob_id: str, name: str) -> None:
    """Small (non-LFS) files carry git's blob sha1 instead of a sha256."""
    if await asyncio.to_thread(blob_digest, dest, blob_id) != blob_id:
        await asyncio.to_thread(dest.unlink, missing_ok=True)
        await asyncio.to_thread(unsynced_marker(dest).unlink, missing_ok=True)
        raise BadRequest(f"{name}: content does not match the Hub's hash", code="checksum_mismatch")


class Puller:
    """Pulls references into a :class:`ModelCache`; one instance per server or CLI run."""

    def __init__(
        self,
        cache: ModelCache,
        tuning: Tuning | None = None,
        on_file: Callable[[Counters], None] = lambda counters: None,
    ) -> None:
        self.cache = cache
        self.tuning = tuning or Tuning()
        self.counters: list[Counters] = []
        self._on_file = on_file
        self._flushing: set[asyncio.Future[None]] = set()

    def _flush_later(self, blob: Path) -> None:
        """Flush a new blob to the disk in the background: the model is usable meanwhile."""
        self.cache.syncing.add(blob)
        future = asyncio.get_running_loop().run_in_executor(None, make_durable, blob)
        self._flushing.add(future)

        def done(f: asyncio.Future[None]) -> None:
            self._flushing.discard(f)
            self.cache.syncing.discard(blob)
            if not f.cancelled() and f.exception() is not None:  # the marker stays: re-hashed
                log.warning("could not flush %s to the disk: %s", blob, f.exception())

        future.add_done_callback(done)

    async def durable(self, within: float | None = None) -> bool:
        """Wait until every blob this puller downloaded is on the disk, for at most ``within``
        seconds (False: time ran out; the flushes go on, and a blob left unflushed at exit is
        checked at its next use)."""
        while self._flushing:
            _, pending = await asyncio.wait(set(self._flushing), timeout=within)
            if pending:
                return False
        return True

    async def pull(
        self, ref: ModelRef, on_event: EventFn | None = None, refresh: bool = False
    ) -> CachedModel:
        emit = on_event or (lambda event: None)
        key = str(ref)
        if not refresh:
            cached = await asyncio.to_thread(self.cache.lookup, key, ref.repo_id)
            if cached is not None:
                emit(PullEvent("done", key, total=cached.size, done=cached.size, cached=True))
                return cached
        if offline():
            raise ServiceUnavailable(
                f"{key} is not in the cache and HF_HUB_OFFLINE is set", code="offline"
            )
        endpoint, token = hub_endpoint(), hub_token()
        listing = await asyncio.to_thread(_model_info, ref, endpoint, token)
        wanted = choose_files(ref, list(listing.files))
        total = sum(listing.files[f][0] for f in wanted)
        emit(PullEvent("resolved", key, total=total))
        done: dict[str, int] = {}

        def file_event(
            kind: Literal["progress", "file_done"], name: str, on_disk: int, size: int
        ) -> None:
            done[name] = on_disk
            emit(
                PullEvent(
                    kind, key, file=name, done=sum(done.values()), total=total,
                    file_done=on_disk, file_total=size,
                )
            )  # fmt: skip

        def progress_for(name: str) -> Callable[[int, int], None]:
            return lambda on_disk, size: file_event("progress", name, on_disk, size)

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with new_session(self.tuning.connections) as session:

            async def fetch(path: str) -> CachedFile:
                size, sha256, blob_id = listing.files[path]
                blob = (sha256 or blob_id).lower()
                if not blob:
                    raise BadRequest(f"the Hub gave no hash for {path}", code="unsafe_path")
                if await asyncio.to_thread(self.cache.find_blob, ref.repo_id, blob, size) is None:
                    url = (
                        f"{endpoint}/{ref.repo_id}/resolve/{listing.commit}/"
                        f"{urllib.parse.quote(safe_relative_path(path))}"
                    )
                    dest = self.cache.blob_path(ref.repo_id, blob)
                    remote = RemoteFile(url=url, size=size, sha256=sha256, name=path)
                    counters = await download(
                        session, remote, dest, tuning=self.tuning, headers=headers,
                        progress=progress_for(path),
                    )  # fmt: skip
                    self.counters.append(counters)
                    self._on_file(counters)
                    if sha256 is None and blob_id:
                        await _check_git_blob(dest, blob_id, path)
                    self._flush_later(dest)
                file_event("file_done", path, size, size)
                await asyncio.to_thread(
                    self.cache.link_snapshot, ref.repo_id, listing.commit, path, blob
                )
                return CachedFile(path, blob, size)

            files = await asyncio.gather(*(fetch(path) for path in wanted))
        await asyncio.to_thread(self.cache.write_ref, ref.repo_id, ref.revision, listing.commit)
        model = await asyncio.to_thread(
            self.cache.record, key, ref.repo_id, listing.commit, list(files)
        )
        emit(PullEvent("done", key, done=total, total=total))
        return model


def model_paths(cache: ModelCache, model: CachedModel) -> list[Path]:
    return [cache.snapshot_path(model.repo_id, model.commit, f.path) for f in model.files]
