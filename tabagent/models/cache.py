"""The model cache, laid out like the Hugging Face hub cache so both tools share files.

    <root>/models--<org>--<name>/
        blobs/<sha256 or git sha1>          the file contents, named by their hash
        snapshots/<commit>/<path>           relative symlinks into blobs/ (copies where links fail)
        refs/<revision>                     the commit a branch or tag pointed to
        .tabagent/manifest.json             our pulls: reference -> commit and files, last use

``huggingface_hub.hf_hub_download(..., cache_dir=<root>, local_files_only=True)`` finds what
we pulled, and a blob another tool put in the standard HF cache (``HF_HUB_CACHE``) is linked in
instead of downloaded again. Every path is built from validated parts (``refs.safe_relative_path``)
and checked to stay under its repo folder.

A freshly downloaded blob is flushed to the disk in the background; until then a
``<blob>.tabagent-unsynced`` marker sits beside it. :meth:`ModelCache.settle` hashes a blob that
still has one (after a crash or a power cut) before it is used: a blob whose name is its hash
proves itself, and one the disk lost is deleted, so the pull fetches it again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tabagent.errors import BadRequest
from tabagent.models.downloader import (
    PARTIAL_SUFFIX,
    STATE_SUFFIX,
    UNSYNCED_SUFFIX,
    make_durable,
    unsynced_marker,
)
from tabagent.models.refs import check_repo_id, safe_relative_path

log = logging.getLogger(__name__)

MANIFEST = ".tabagent/manifest.json"
ORPHAN_MARKER_S = 3600  # gc deletes an unsynced marker with no blob nor download after this


@dataclass(frozen=True)
class CachedFile:
    path: str  # inside the repo
    blob: str  # blob name (sha256 for LFS files, git sha1 otherwise)
    size: int


@dataclass(frozen=True)
class CachedModel:
    ref: str
    repo_id: str
    commit: str
    files: tuple[CachedFile, ...]
    last_used: float
    pulled_at: float

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


def blob_digest(path: Path, blob: str) -> str:
    """The hash a blob is named by: sha256 for LFS files, git's blob sha1 (40 digits) otherwise."""
    if len(blob) == 40:
        digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode(), usedforsecurity=False)
    else:
        digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_hf_cache() -> Path:
    if "HF_HUB_CACHE" in os.environ:
        return Path(os.environ["HF_HUB_CACHE"])
    hf_home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
    )
    return Path(hf_home) / "hub"


class ModelCache:
    def __init__(self, root: Path, shared: list[Path] | None = None) -> None:
        self.root = root
        self.shared = [
            p for p in (shared if shared is not None else [default_hf_cache()]) if p != root
        ]
        # blobs this process is flushing right now: their markers are expected, not a crash's
        self.syncing: set[Path] = set()
        self._settle_lock = threading.Lock()

    # ---- layout ----

    def repo_dir(self, repo_id: str, root: Path | None = None) -> Path:
        org, name = check_repo_id(repo_id).split("/")
        return (root or self.root) / f"models--{org}--{name}"

    def blob_path(self, repo_id: str, blob: str) -> Path:
        if not blob or not all(c in "0123456789abcdef" for c in blob.lower()):
            raise BadRequest(f"{blob!r} is not a blob hash", code="unsafe_path")
        return self.repo_dir(repo_id) / "blobs" / blob.lower()

    def snapshot_path(self, repo_id: str, commit: str, path: str) -> Path:
        if not commit.isalnum():
            raise BadRequest(f"{commit!r} is not a commit", code="unsafe_path")
        base = self.repo_dir(repo_id) / "snapshots" / commit
        target = base / safe_relative_path(path)
        # the file itself is a symlink into blobs/; its folder must not lead out of the snapshot
        if not target.parent.resolve().is_relative_to(base.resolve()):
            raise BadRequest(f"{path!r} leaves the snapshot", code="unsafe_path")
        return target

    def settle(self, path: Path) -> bool:
        """Whether the blob at ``path`` may be used: a blob left unsynced by a crash or a power
        cut is hashed; if it matches its name it is flushed and kept, else it is deleted."""
        if not self._marked(path):
            return path.is_file()
        marker = unsynced_marker(path)
        with self._settle_lock:  # one hash per blob, even when several lookups find it
            if not marker.exists():
                return path.is_file()
            if not path.is_file():
                return False  # a download in progress, or one that never finished
            log.info("checking %s: its flush to the disk was interrupted", path)
            try:
                intact = blob_digest(path, path.name) == path.name
            except OSError as exc:  # unreadable: not usable, and not ours to delete blindly
                log.warning("cannot check %s: %s", path, exc)
                return False
            if intact:
                try:
                    make_durable(path)
                except OSError as exc:  # usable all the same; checked again next time
                    log.warning("cannot flush %s to the disk: %s", path, exc)
                return True
            log.warning("%s did not survive an interrupted flush to the disk: deleted", path)
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
                marker.unlink(missing_ok=True)
            return False

    def find_blob(self, repo_id: str, blob: str, size: int) -> Path | None:
        """Our blob, or one another Hugging Face tool downloaded (linked into ours)."""
        ours = self.blob_path(repo_id, blob)
        if ours.is_file() and ours.stat().st_size == size and self.settle(ours):
            return ours
        for root in self.shared:
            theirs = self.repo_dir(repo_id, root) / "blobs" / blob.lower()
            if theirs.is_file() and theirs.stat().st_size == size:
                ours.parent.mkdir(parents=True, exist_ok=True)
                tmp = ours.with_name(ours.name + ".linking")
                tmp.unlink(missing_ok=True)
                try:
                    os.link(theirs, tmp)  # same file system: no copy, no extra space
                except OSError:  # another file system: a copy, on the disk before it is named
                    shutil.copyfile(theirs, tmp)
                    make_durable(tmp)
                os.replace(tmp, ours)
                return ours
        return None

    def link_snapshot(self, repo_id: str, commit: str, path: str, blob: str) -> Path:
        target = self.snapshot_path(repo_id, commit, path)
        target.parent.mkdir(parents=True, exist_ok=True)
        blob_file = self.blob_path(repo_id, blob)
        relative = os.path.relpath(blob_file, target.parent)
        tmp = target.with_name(target.name + ".linking")
        tmp.unlink(missing_ok=True)
        try:
            os.symlink(relative, tmp)
        except OSError:  # Windows without developer mode: a hard link, else a copy
            try:
                os.link(blob_file, tmp)
            except OSError:
                shutil.copyfile(blob_file, tmp)
        os.replace(tmp, target)
        return target

    def write_ref(self, repo_id: str, revision: str, commit: str) -> None:
        if revision == commit:
            return
        ref = self.repo_dir(repo_id) / "refs" / safe_relative_path(revision)
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(commit)

    # ---- our manifest of pulls ----

    def _manifest_path(self, repo_id: str) -> Path:
        return self.repo_dir(repo_id) / MANIFEST

    def _read_manifest(self, repo_id: str) -> dict[str, Any]:
        try:
            data = json.loads(self._manifest_path(repo_id).read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _write_manifest(self, repo_id: str, data: dict[str, Any]) -> None:
        path = self._manifest_path(repo_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)

    def record(self, ref: str, repo_id: str, commit: str, files: list[CachedFile]) -> CachedModel:
        data = self._read_manifest(repo_id)
        now = time.time()
        data[ref] = {
            "commit": commit,
            "files": [[f.path, f.blob, f.size] for f in files],
            "pulled_at": now,
            "last_used": now,
        }
        self._write_manifest(repo_id, data)
        return self._entry(ref, repo_id, data[ref])

    def _entry(self, ref: str, repo_id: str, raw: dict[str, Any]) -> CachedModel:
        return CachedModel(
            ref=ref,
            repo_id=repo_id,
            commit=str(raw["commit"]),
            files=tuple(CachedFile(str(p), str(b), int(s)) for p, b, s in raw["files"]),
            last_used=float(raw.get("last_used", 0)),
            pulled_at=float(raw.get("pulled_at", 0)),
        )

    def lookup(self, ref: str, repo_id: str) -> CachedModel | None:
        """The pulled model if every file is present with its size: then no network at all."""
        raw = self._read_manifest(repo_id).get(ref)
        if raw is None:
            return None
        entry = self._entry(ref, repo_id, raw)
        for f in entry.files:
            blob = self.blob_path(repo_id, f.blob)
            snap = self.snapshot_path(repo_id, entry.commit, f.path)
            if not (blob.is_file() and blob.stat().st_size == f.size and snap.exists()):
                return None
        return entry if self.intact(entry) else None

    def _marked(self, blob: Path) -> bool:
        """Whether ``blob`` carries an unsynced marker that is not this process's own flush."""
        return blob not in self.syncing and unsynced_marker(blob).exists()

    def unsettled(self, model: CachedModel) -> bool:
        """Whether a blob of ``model`` carries a crash's unsynced marker (cheap: no hashing)."""
        return any(self._marked(self.blob_path(model.repo_id, f.blob)) for f in model.files)

    def intact(self, model: CachedModel) -> bool:
        """Whether every blob of ``model`` may be used (see :meth:`settle`)."""
        return all(self.settle(self.blob_path(model.repo_id, f.blob)) for f in model.files)

    def touch(self, ref: str, repo_id: str) -> None:
        data = self._read_manifest(repo_id)
        if ref in data:
            data[ref]["last_used"] = time.time()
            self._write_manifest(repo_id, data)

    def models(self) -> list[CachedModel]:
        found: list[CachedModel] = []
        if not self.root.is_dir():
            return found
        for folder in sorted(self.root.glob("models--*--*")):
            _, org, name = folder.name.split("--", 2)
            repo_id = f"{org}/{name}"
            with contextlib.suppress(BadRequest, KeyError, ValueError, TypeError):
                for ref, raw in self._read_manifest(repo_id).items():
                    found.append(self._entry(ref, repo_id, raw))
        return found

    # ---- management ----

    def remove(self, ref: str, repo_id: str) -> int:
        """Forget a pull; blobs no other pull of the repo uses are deleted. Returns bytes freed."""
        data = self._read_manifest(repo_id)
        if ref not in data:
            raise BadRequest(f"{ref} is not in the cache", code="model_not_found")
        del data[ref]
        self._write_manifest(repo_id, data)
        freed = self.gc_repo(repo_id)
        if not data:
            shutil.rmtree(self.repo_dir(repo_id), ignore_errors=True)
        return freed

    def gc_repo(self, repo_id: str, stale_partials: float = 7 * 86400) -> int:
        """Delete blobs no pull refers to, and partial downloads untouched for a week."""
        repo = self.repo_dir(repo_id)
        used = {
            blob for raw in self._read_manifest(repo_id).values() for _, blob, _ in raw["files"]
        }
        freed = 0
        blobs = repo / "blobs"
        if not blobs.is_dir():
            return 0
        now = time.time()
        for blob in blobs.iterdir():
            if blob.name.endswith(UNSYNCED_SUFFIX):
                owner = blob.with_name(blob.name.removesuffix(UNSYNCED_SUFFIX))
                orphan = (
                    not owner.exists() and not owner.with_name(owner.name + PARTIAL_SUFFIX).exists()
                )
                # an hour: a download makes its marker a moment before its partial file
                with contextlib.suppress(FileNotFoundError):  # gone with its blob, above
                    if orphan and now - blob.stat().st_mtime > ORPHAN_MARKER_S:
                        blob.unlink()  # its download was deleted or never finished
                continue
            partial = blob.name.endswith((PARTIAL_SUFFIX, STATE_SUFFIX))
            stale = partial and now - blob.stat().st_mtime > stale_partials
            if (not partial and blob.name not in used) or stale:
                freed += blob.stat().st_size
                blob.unlink()
                if not partial:
                    unsynced_marker(blob).unlink(missing_ok=True)
        for snapshot in (repo / "snapshots").glob("*/**/*"):
            if snapshot.is_symlink() and not snapshot.exists():
                snapshot.unlink()
        return freed

    def gc(self) -> int:
        return sum(self.gc_repo(m) for m in {c.repo_id for c in self.models()})

    def enforce_budget(self, budget_bytes: int, protected: set[str]) -> list[str]:
        """Evict least-recently-used pulls until the cache fits; never a protected (loaded) one."""
        models = sorted(self.models(), key=lambda m: m.last_used)
        total = sum(m.size for m in models)
        evicted = []
        for model in models:
            if total <= budget_bytes:
                break
            if model.ref in protected:
                continue
            self.remove(model.ref, model.repo_id)
            total -= model.size
            evicted.append(model.ref)
        return evicted
