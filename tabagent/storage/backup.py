"""Backup and restore of all seven stores as one consistent archive.

**Backup, while the server keeps writing.** Inside the writer thread (so no write transaction
is open on any database) a read transaction is begun on every SQLite store: those seven
snapshots are one instant. The vector sync is paused meanwhile (its lock held), so LanceDB does
not change until it is copied; vectors committed after the instant wait in the outboxes, and
the snapshot's own outboxes carry what LanceDB did not have yet. Writers are held only for the
moment it takes to begin the read transactions; pages are copied afterwards with SQLite's
backup API from those snapshots.

The archive is a tar file: ``manifest.json`` (format, versions, and the size and sha256 of
every other member), then the files. It is written under a temporary name and renamed.

**Restore** never touches the live databases until the archive is proven whole: the manifest is
read, every member's path is checked (nothing may land outside the target), its size and sha256
compared, each SQLite file passes ``PRAGMA integrity_check`` and has a schema this TabAgent
knows. Only then is the current folder renamed aside (``<db>.before-restore-<time>``, kept) and
the restored one renamed into place. The server must be stopped (the databases' lock says so).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sqlite3
import tarfile
import tempfile
import time
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from tabagent import __version__
from tabagent.errors import BadRequest, Conflict, SchemaTooNew, StorageError
from tabagent.storage.lock import DatabaseLock

if TYPE_CHECKING:
    from tabagent.storage.memory import Memory

FORMAT = "tabagent-memory-backup"
FORMAT_VERSION = 1
_CHUNK = 1 << 20


class BackupInfo(BaseModel):
    path: str
    bytes: int
    files: int
    created_at: float
    stores: dict[str, int]  # store -> schema version
    seconds: float


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def backup(memory: Memory, target: Path) -> BackupInfo:
    """Write a consistent archive of ``memory`` to ``target`` (blocking; run off the loop)."""
    started = time.monotonic()
    target = target.expanduser().absolute()
    if target.is_dir() or not target.suffix:
        target = target / f"tabagent-memory-{time.strftime('%Y%m%d-%H%M%S')}.tar"
    if target.suffix != ".tar":
        raise BadRequest(f"a backup is a .tar file, not {target.name!r}", param="path")
    if target.exists():  # never overwrite: the path may come from an API client
        raise Conflict(f"{target} exists; choose a new name or a folder", code="file_exists")
    target.parent.mkdir(parents=True, exist_ok=True)
    sync = memory.sync
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".backup-") as tmp:
        staging = Path(tmp)
        with sync.lock:  # LanceDB is frozen from here until it is copied
            snapshots = memory.writer.run(memory.dbs["meta"], lambda _: _begin_snapshots(memory))
            try:
                for name, conn in snapshots.items():
                    dest = sqlite3.connect(staging / f"{name}.db")
                    try:
                        conn.backup(dest)
                    finally:
                        dest.close()
            finally:
                for conn in snapshots.values():
                    conn.close()
            vectors = memory.vectors.root
            if vectors.exists():
                shutil.copytree(vectors, staging / "embeddings")
        files = sorted(p for p in staging.rglob("*") if p.is_file())
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "tabagent_version": __version__,
            "created_at": time.time(),
            "stores": {name: db.version for name, db in memory.dbs.items()},
            "files": {
                p.relative_to(staging).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
                for p in files
            },
        }
        partial = target.with_name(target.name + ".partial")
        with tarfile.open(partial, "w") as tar:
            data = json.dumps(manifest, indent=1).encode()
            info = tarfile.TarInfo("manifest.json")
            info.size = len(data)
            info.mtime = int(time.time())
            tar.addfile(info, _BytesReader(data))
            for p in files:
                tar.add(p, arcname=p.relative_to(staging).as_posix(), recursive=False)
        with open(partial, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(partial, target)
    return BackupInfo(
        path=str(target),
        bytes=target.stat().st_size,
        files=len(files),
        created_at=manifest["created_at"],
        stores=manifest["stores"],
        seconds=time.monotonic() - started,
    )


def _begin_snapshots(memory: Memory) -> dict[str, sqlite3.Connection]:
    """Runs on the writer thread: one read transaction per store, all at the same instant."""
    snapshots = {}
    for name, db in memory.dbs.items():
        conn = sqlite3.connect(f"{db.path.resolve().as_uri()}?mode=ro", uri=True,
                               isolation_level=None, check_same_thread=False)  # fmt: skip
        conn.execute("BEGIN")
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()  # pins the snapshot
        snapshots[name] = conn
    return snapshots


class _BytesReader:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._data) if n < 0 else self._pos + n
        chunk = self._data[self._pos : end]
        self._pos += len(chunk)
        return chunk


# -- restore ---------------------------------------------------------------------------------


def _member_path(name: str) -> PurePosixPath:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or not path.parts or "\\" in name:
        raise BadRequest(f"archive member {name!r} would land outside the database folder")
    return path


def verify(archive: Path, into: Path, known_versions: dict[str, int]) -> dict[str, Any]:
    """Extract ``archive`` into the empty folder ``into`` and prove it whole; returns the
    manifest. Raises BadRequest (not a backup, damaged) or SchemaTooNew."""
    try:
        tar = tarfile.open(archive, "r")  # noqa: SIM115 - closed by the with below
    except (OSError, tarfile.TarError) as exc:
        raise BadRequest(f"{archive} is not a TabAgent backup: {exc}") from None
    with tar:
        try:
            first = tar.next()
            if first is None or first.name != "manifest.json":
                raise BadRequest(f"{archive} is not a TabAgent backup (no manifest first)")
            stream = tar.extractfile(first)
            assert stream is not None
            manifest = json.loads(stream.read())
        except (tarfile.TarError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadRequest(f"{archive}: unreadable manifest: {exc}") from None
        if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
            raise BadRequest(f"{archive} is not a TabAgent memory backup of a known format")
        expected: dict[str, dict[str, Any]] = manifest["files"]
        seen: set[str] = set()
        try:
            for member in tar:
                if member is first:
                    continue
                rel = _member_path(member.name)
                key = rel.as_posix()
                if not member.isfile() or key not in expected:
                    raise BadRequest(f"{archive}: unexpected member {member.name!r}")
                dest = into.joinpath(*rel.parts)
                dest.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(member)
                assert src is not None
                digest = hashlib.sha256()
                size = 0
                with dest.open("wb") as out:
                    while chunk := src.read(_CHUNK):
                        digest.update(chunk)
                        size += len(chunk)
                        out.write(chunk)
                if size != expected[key]["size"] or digest.hexdigest() != expected[key]["sha256"]:
                    raise BadRequest(f"{archive}: {key} is damaged (checksum mismatch)")
                seen.add(key)
        except (tarfile.TarError, OSError) as exc:
            raise BadRequest(f"{archive} is damaged: {exc}") from None
    missing = set(expected) - seen
    if missing:
        raise BadRequest(f"{archive} is incomplete: missing {sorted(missing)[:3]}")
    for store, version in manifest["stores"].items():
        if version > known_versions.get(store, 0):
            raise SchemaTooNew(f"the backup's {store} has schema {version}, newer than this build")
        path = into / f"{store}.db"
        if not path.is_file():
            raise BadRequest(f"{archive} has no {store} database")
        conn = sqlite3.connect(path)
        try:
            result = conn.execute("PRAGMA integrity_check").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise BadRequest(f"{archive}: {store} is not a SQLite database: {exc}") from None
        finally:
            conn.close()
        if result != "ok":
            raise BadRequest(f"{archive}: {store} failed its integrity check: {result}")
    return dict(manifest)


def restore(archive: Path, db_path: Path, known_versions: dict[str, int]) -> Path | None:
    """Replace the databases at ``db_path`` with the archive's, after verifying it.

    Returns where the previous databases were moved (None if there were none).
    """
    archive = archive.expanduser().absolute()
    if not archive.is_file():
        raise BadRequest(f"no backup at {archive}")
    db_path.parent.mkdir(parents=True, exist_ok=True)
    with DatabaseLock(db_path) as lock:
        if not lock.acquired:
            raise Conflict(
                f"the databases at {db_path} are in use by a running TabAgent; stop it first",
                code="database_in_use",
            )
        staging = Path(tempfile.mkdtemp(dir=db_path.parent, prefix=f".{db_path.name}.restore-"))
        try:
            verify(archive, staging, known_versions)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        previous = None
        if db_path.exists():
            previous = db_path.with_name(f"{db_path.name}.before-restore-{int(time.time())}")
            os.replace(db_path, previous)
        try:
            os.replace(staging, db_path)
        except OSError as exc:
            if previous is not None:
                with contextlib.suppress(OSError):
                    os.replace(previous, db_path)
            raise StorageError(f"restore failed, nothing changed: {exc}") from exc
        return previous
