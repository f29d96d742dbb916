"""Sharded Parquet datasets with a manifest that is written last.

A folder holds ``part-*.parquet`` shards and ``manifest.json``. A shard is written (atomically)
first, then committed by rewriting the manifest with its name, row count, size and sha256. Readers
trust only the manifest, so a killed writer leaves at most an unlisted file, which the next writer
overwrites. Once ``complete`` is set the dataset is immutable.

Where many tasks write shards of one folder at once, each writes its shard plus a commit record
(``put_shard``) and one final step commits all records in a single manifest write (``commit_recorded``).
"""

from __future__ import annotations

import datetime as dt
import io
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distill_core.errors import CacheError
from distill_core.storage import Storage, sha256_bytes
from distill_core.version import CODE_VERSION

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
RECORD_SUFFIX = ".commit.json"  # per-shard commit record, see ShardStore.put_shard


@dataclass(frozen=True)
class ShardEntry:
    name: str
    rows: int
    bytes: int
    sha256: str
    source: str  # the input shard this one was computed from ("" when none)


def list_array(rows, value_type: pa.DataType) -> pa.ListArray:
    """A 2-D numpy array [n, m] as an Arrow list column of ``value_type`` (one list of m values per row)."""
    n, m = rows.shape
    offsets = pa.array(np.arange(0, n * m + 1, m, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(rows.reshape(-1), value_type))


def table_to_parquet_bytes(table: pa.Table) -> bytes:
    """zstd Parquet bytes; deterministic for a given table and pyarrow version."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", write_statistics=False)
    return buf.getvalue()


class ShardStore:
    """One sharded dataset (data, top-k cache, samples, beams) under ``storage/<folder>``.

    ``meta`` describes how the contents were made (teacher, tokenizer hash, k, ...). Opening an
    existing folder with different ``meta`` raises :class:`CacheError` naming each difference.
    """

    def __init__(self, storage: Storage, folder: str, kind: str, fingerprint: str, meta: dict[str, Any]):
        self.storage = storage
        self.folder = folder.strip("/")
        self.kind = kind
        self.fingerprint = fingerprint
        self.meta = meta
        self._manifest = self._load_or_new()

    # -- manifest -----------------------------------------------------------------------------
    def _rel(self, name: str) -> str:
        return f"{self.folder}/{name}"

    def _load_or_new(self) -> dict[str, Any]:
        rel = self._rel(MANIFEST)
        if not self.storage.exists(rel):
            return {
                "schema_version": SCHEMA_VERSION,
                "kind": self.kind,
                "fingerprint": self.fingerprint,
                "meta": self.meta,
                "shards": [],
                "complete": False,
                "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
                "code_version": CODE_VERSION,
            }
        manifest = read_manifest(self.storage, self.folder)
        expected = {"kind": self.kind, "fingerprint": self.fingerprint, "meta": self.meta}
        found = {"kind": manifest["kind"], "fingerprint": manifest["fingerprint"], "meta": manifest["meta"]}
        diffs = _differences(expected, _jsonable(found))
        if diffs:
            raise CacheError(
                f"{self.storage.url(self.folder)} was written with other settings: {'; '.join(diffs)}. "
                "Point the run at a fresh folder, or delete this one to recompute it."
            )
        return manifest

    def _commit_manifest(self) -> None:
        self.storage.write_json(self._rel(MANIFEST), self._manifest)

    @property
    def complete(self) -> bool:
        return bool(self._manifest["complete"])

    @property
    def shards(self) -> list[ShardEntry]:
        return [ShardEntry(**s) for s in self._manifest["shards"]]

    @property
    def num_rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def num_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def committed(self, name: str) -> bool:
        return any(s["name"] == name for s in self._manifest["shards"])

    # -- writing ------------------------------------------------------------------------------
    def _write(self, name: str, table: pa.Table, source: str) -> ShardEntry:
        """Write the shard file (atomically); committing it is the caller's next step."""
        if self.complete:
            raise CacheError(f"{self.storage.url(self.folder)} is complete and immutable; it takes no new shards.")
        if self.committed(name):
            raise CacheError(f"shard {name} of {self.storage.url(self.folder)} is already committed.")
        data = table_to_parquet_bytes(table)
        self.storage.write_bytes(self._rel(name), data)
        return ShardEntry(name=name, rows=table.num_rows, bytes=len(data), sha256=sha256_bytes(data), source=source)

    def write_shard(self, name: str, table: pa.Table, source: str = "") -> ShardEntry:
        """Write ``table`` as shard ``name`` and commit it in the manifest."""
        entry = self._write(name, table, source)
        self._manifest["shards"].append(entry.__dict__)
        self._manifest["shards"].sort(key=lambda s: s["name"])
        self._commit_manifest()
        return entry

    # -- many writers: record each shard, commit them all in one manifest write ------------------
    # Shard tasks that run at once (threads, Dask workers) must not rewrite the shared manifest: the
    # last writer would drop the others' entries. Each writes its shard, then a small record
    # ``<name>.commit.json`` holding its entry (so a record never exists without its whole shard);
    # one final step lists the records in the manifest. Readers still trust only the manifest.
    def put_shard(self, name: str, table: pa.Table, source: str = "") -> ShardEntry:
        """Write shard ``name`` and its commit record without touching the manifest.

        Safe to call concurrently for distinct names; :meth:`commit_recorded` lists them later."""
        entry = self._write(name, table, source)
        self.storage.write_json(self._rel(name + RECORD_SUFFIX), entry.__dict__)
        return entry

    def recorded(self) -> set[str]:
        """Names of shards that have a commit record (written whole, committed or not). One listing."""
        return {n[: -len(RECORD_SUFFIX)] for n in self.storage.listdir(self.folder) if n.endswith(RECORD_SUFFIX)}

    def recorded_entry(self, name: str) -> ShardEntry | None:
        rel = self._rel(name + RECORD_SUFFIX)
        return ShardEntry(**self.storage.read_json(rel)) if self.storage.exists(rel) else None

    def commit_recorded(self) -> list[ShardEntry]:
        """List every recorded, not yet committed shard in the manifest (one write); returns them.

        Run by one writer at a time (the stage's final step). A record whose shard is missing or has
        another size is dropped, with its record, so the shard is computed again. Records are kept
        after the commit: a manifest that lost entries (two commits racing) heals at the next one."""
        self._manifest = self._load_or_new()  # the stored manifest, not the one read at open
        new = []
        for name in sorted(self.recorded()):
            if self.committed(name):
                continue
            entry = self.recorded_entry(name)
            if entry is None:
                continue
            if not self.storage.exists(self._rel(name)) or self.storage.size(self._rel(name)) != entry.bytes:
                self.storage.remove(self._rel(name + RECORD_SUFFIX))
                continue
            new.append(entry)
        if new or not self.storage.exists(self._rel(MANIFEST)):
            self._manifest["shards"] = sorted(self._manifest["shards"] + [e.__dict__ for e in new], key=lambda s: s["name"])
            self._commit_manifest()
        return new

    def finalize(self, extra: dict[str, Any] | None = None) -> None:
        """Mark the dataset complete (immutable); ``extra`` goes into the manifest's ``stats``."""
        if extra:
            self._manifest["stats"] = extra
        self._manifest["complete"] = True
        self._commit_manifest()

    # -- reading ------------------------------------------------------------------------------
    def read_shard(self, name: str, columns: Sequence[str] = ()) -> pa.Table:
        """Shard ``name``; ``columns`` are the ones the caller reads, refused with the fix when absent."""
        return read_shard(self.storage, self.folder, self._entry(name), columns)

    def _entry(self, name: str) -> ShardEntry:
        for s in self.shards:
            if s.name == name:
                return s
        raise CacheError(f"shard {name} is not committed in {self.storage.url(self.folder)}.")

    def iter_tables(self, columns: Sequence[str] = ()) -> Iterator[tuple[ShardEntry, pa.Table]]:
        for entry in self.shards:
            yield entry, read_shard(self.storage, self.folder, entry, columns)


def read_manifest(storage: Storage, folder: str) -> dict[str, Any]:
    """Load and check a manifest; refuses a missing one and one from a newer schema."""
    rel = f"{folder.strip('/')}/{MANIFEST}"
    if not storage.exists(rel):
        raise CacheError(
            f"no manifest at {storage.url(rel)}: the stage that writes it has not finished, or its output was "
            "deleted since. Run that stage (again with --refresh-cache if it had finished)."
        )
    manifest = storage.read_json(rel)
    version = manifest.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        writer = manifest.get("code_version") or "a newer version"
        raise CacheError(
            f"{storage.url(rel)} has schema version {version}, newer than this code's {SCHEMA_VERSION} "
            f"(distillery {CODE_VERSION}); it was written by distillery {writer}. Install that version (or a later "
            "one) to use it, or point storage.root at another folder so this version computes its own."
        )
    return manifest


def read_shard(storage: Storage, folder: str, entry: ShardEntry, columns: Sequence[str] = ()) -> pa.Table:
    """Read one committed shard, refusing it when its bytes differ from the manifest's checksum or
    when it lacks one of ``columns`` (a shard of another kind or layout under a matching checksum)."""
    rel = f"{folder.strip('/')}/{entry.name}"
    if not storage.exists(rel):
        raise CacheError(f"shard {storage.url(rel)} is listed in the manifest but missing: recompute the cache.")
    data = storage.read_bytes(rel)
    if len(data) != entry.bytes or sha256_bytes(data) != entry.sha256:
        raise CacheError(
            f"shard {storage.url(rel)} does not match its manifest checksum (truncated or edited on disk). "
            "Run the stage that wrote it with recompute_damaged=True to recompute the damaged shards "
            "(for a teacher cache: `distillery repair-cache CONFIG --run-id RUN_ID`); finished shards are kept."
        )
    table = pq.read_table(io.BytesIO(data))
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise CacheError(
            f"shard {storage.url(rel)} has the columns {table.column_names}, but its reader needs {list(columns)} "
            f"(missing {missing}): the file is not a shard of this folder's layout, though the manifest lists its "
            f"checksum. Delete {storage.url(rel)}, then run `distillery repair-cache CONFIG --run-id RUN_ID`, which "
            "recomputes the missing shard; the other shards are kept."
        )
    return table


def drop_damaged_shards(storage: Storage, folder: str) -> list[str]:
    """Verify every shard of ``folder`` against its checksum; forget the damaged ones so they are recomputed.

    A committed shard that is missing, truncated or edited is removed from the manifest (which is
    then no longer ``complete``), together with its file and commit record; a recorded but not yet
    committed shard whose bytes differ from its record loses both. The writer's next run computes
    exactly those shards again. Returns the names dropped, sorted; intact shards are untouched."""
    folder = folder.strip("/")
    manifest = read_manifest(storage, folder)
    store = ShardStore(storage, folder, kind=manifest["kind"], fingerprint=manifest["fingerprint"], meta=manifest["meta"])
    damaged = [e.name for e in store.shards if not _intact(storage, f"{folder}/{e.name}", e)]
    committed = {e.name for e in store.shards}
    for name in sorted(store.recorded() - committed):
        entry = store.recorded_entry(name)
        if entry is not None and not _intact(storage, f"{folder}/{name}", entry):
            damaged.append(name)
    if not damaged:
        return []
    for name in damaged:  # records first, so a later commit cannot list a damaged shard again
        storage.remove(f"{folder}/{name}{RECORD_SUFFIX}")
    manifest["shards"] = [s for s in manifest["shards"] if s["name"] not in damaged]
    manifest["complete"] = False
    storage.write_json(f"{folder}/{MANIFEST}", manifest)
    for name in damaged:
        storage.remove(f"{folder}/{name}")
    return sorted(damaged)


def _intact(storage: Storage, rel: str, entry: ShardEntry) -> bool:
    if not storage.exists(rel):
        return False
    data = storage.read_bytes(rel)
    return len(data) == entry.bytes and sha256_bytes(data) == entry.sha256


def _jsonable(obj: Any) -> Any:
    import json

    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _differences(expected: dict, found: dict, prefix: str = "") -> list[str]:
    expected, found = _jsonable(expected), _jsonable(found)
    out = []
    for key in sorted(set(expected) | set(found)):
        e, f = expected.get(key), found.get(key)
        if isinstance(e, dict) and isinstance(f, dict):
            out += _differences(e, f, f"{prefix}{key}.")
        elif e != f:
            out.append(f"{prefix}{key} is {f!r} there, {e!r} here")
    return out


def ragged(col) -> np.ndarray:
    """A variable-length list column as an object array of numpy arrays."""
    arr = col.combine_chunks()
    values = arr.values.to_numpy(zero_copy_only=False)
    offsets = arr.offsets.to_numpy()
    return object_array([values[offsets[i] : offsets[i + 1]] for i in range(len(arr))])


def object_array(items: list) -> np.ndarray:
    """A 1-D object array holding ``items`` as they are (arrays stay whole, never broadcast)."""
    out = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):  # element-wise, so equal-length lists are not broadcast into 2-D
        out[i] = item
    return out
