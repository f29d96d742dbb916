"""One storage root for every artifact: a local folder or any fsspec URL (``s3://bucket/prefix``).

Writes are atomic: a local file is written under a temporary name and renamed; an object store
PUT is atomic per object. Multi-file artifacts (shards, checkpoints, registry versions) commit by
writing a manifest last; readers trust only what a manifest lists.

Code that needs a remote folder as local files (a model for transformers) uses :func:`local_copy`,
which downloads it once into a local cache.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import fsspec

COPY_CHUNK = 8 * 2**20  # bytes read at a time when copying a file (a teacher's weights may be many GB)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


def fingerprint(obj: Any, length: int = 16) -> str:
    """Content hash of a JSON-serialisable value (keys sorted), hex, ``length`` characters."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Storage:
    """A root URL plus the fsspec filesystem that serves it. Paths given to methods are relative."""

    def __init__(self, root: str, storage_options: dict | None = None):
        self.root = root.rstrip("/") if "://" in root else str(Path(root).expanduser().resolve())
        self.storage_options = dict(storage_options or {})
        self.fs, self._root_path = fsspec.core.url_to_fs(self.root, **_fs_options(self.root, self.storage_options))
        self.is_local = "file" in _protocols(self.fs)

    def url(self, *parts: str) -> str:
        """Full URL (or absolute local path) of ``parts`` joined under the root."""
        rel = "/".join(p.strip("/") for p in parts if p)
        return f"{self.root}/{rel}" if rel else self.root

    def _path(self, rel: str) -> str:
        return f"{self._root_path.rstrip('/')}/{rel.strip('/')}" if rel else self._root_path

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self._path(rel))

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open(self._path(rel), "rb") as f:
            return f.read()

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write ``data`` so that readers see either nothing or the whole file."""
        path = self._path(rel)
        if self.is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, data)

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def size(self, rel: str) -> int:
        """Size in bytes of the file ``rel`` (one metadata request on an object store)."""
        return int(self.fs.size(self._path(rel)))

    def write_new(self, rel: str, data: bytes) -> None:
        """Write a file that must not exist yet (immutable artifacts); refuses to overwrite."""
        if self.exists(rel):
            raise FileExistsError(f"{self.url(rel)} already exists and is immutable; choose a new name.")
        self.write_bytes(rel, data)

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Create ``rel`` holding ``data`` unless it exists; True when this call created it (locks).

        Local roots use ``O_CREAT | O_EXCL`` (atomic). Object stores check, then PUT: two creators
        within the same few milliseconds can both succeed there."""
        path = self.local_path(rel)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        try:
            self.write_new(rel, data)
        except FileExistsError:
            return False
        return True

    def epoch(self) -> str:
        """An id for this root's lifetime, made the first time it is asked for: a root that was deleted
        and started again gets a new one, so caches keyed on it never point into the old one."""
        rel = ".distillery-root.json"
        if not self.exists(rel):
            self.create_exclusive(rel, json.dumps({"id": uuid.uuid4().hex}).encode())
        return self.read_json(rel)["id"]

    def listdir(self, rel: str) -> list[str]:
        """Names (not paths) directly under ``rel``; empty when it does not exist."""
        path = self._path(rel)
        if not self.fs.exists(path):
            return []
        return sorted(os.path.basename(p.rstrip("/")) for p in self.fs.ls(path, detail=False))

    def remove(self, rel: str, recursive: bool = False) -> None:
        path = self._path(rel)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=recursive)

    def upload_file(self, local_file: str | Path, rel: str) -> None:
        """Copy the local file ``local_file`` to ``rel`` in chunks (never whole in memory), atomically.

        A local root gets a temporary name, then a rename; an object store gets ``put_file``, which
        sends a large file in parts that become the object only when the last part is committed."""
        path = self._path(rel)
        if not self.is_local:
            self.fs.put_file(str(local_file), path)
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(local_file, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, COPY_CHUNK)
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def upload_dir(self, local_dir: str | Path, rel: str, *, link_from: str | None = None) -> None:
        """Copy every file under ``local_dir`` to ``rel`` (each file streamed and written atomically).

        ``link_from``: a folder of this root; on a local root, a file with the same name and the same
        bytes there is hard-linked instead of copied (committed files are replaced, never rewritten in
        place, so the two stay equal). Object stores copy."""
        local_dir = Path(local_dir)
        for file in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            name = file.relative_to(local_dir).as_posix()
            if not (link_from is not None and self.is_local and self._link_same(file, f"{link_from}/{name}", f"{rel}/{name}")):
                self.upload_file(file, f"{rel}/{name}")

    def _link_same(self, local_file: Path, source_rel: str, rel: str) -> bool:
        """Hard-link ``rel`` to ``source_rel`` when that holds ``local_file``'s bytes; whether it did."""
        import filecmp

        source, path = self._path(source_rel), self._path(rel)
        if not os.path.isfile(source) or not filecmp.cmp(source, local_file, shallow=False):
            return False
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            os.link(source, tmp)
        except OSError:  # another file system, or one without hard links: the caller copies
            return False
        os.replace(tmp, path)
        return True

    def download_dir(self, rel: str, local_dir: str | Path) -> Path:
        """Copy every file under ``rel`` into ``local_dir``; returns ``local_dir``."""
        local_dir = Path(local_dir)
        base = self._path(rel).rstrip("/")
        for path in self.fs.find(base):
            target = local_dir / path[len(base) + 1 :]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.fs.cat_file(path))
        return local_dir

    def local_path(self, rel: str) -> Path | None:
        """The on-disk path of ``rel`` when the root is local, else None."""
        return Path(self._path(rel)) if self.is_local else None

    def local_dir(self, rel: str) -> Path:
        """A local folder with the files under ``rel``: the folder itself when the root is local, else
        its :func:`local_copy`, keyed by the files' sizes and ETags so that changed contents are fetched again."""
        if self.is_local:
            return Path(self._path(rel))
        return local_copy(self.url(rel), self)

    def bytes_io(self, rel: str) -> io.BytesIO:
        return io.BytesIO(self.read_bytes(rel))


def _protocols(fs) -> tuple[str, ...]:
    proto = fs.protocol
    return proto if isinstance(proto, tuple) else (proto,)


def _fs_options(url: str, storage_options: dict) -> dict:
    options = dict(storage_options)
    if "://" in url and not url.startswith("file://"):
        # Other processes (shard tasks on Dask workers, a concurrent run) write under the same
        # prefixes, so a cached directory listing would hide their files: always ask the store.
        options.setdefault("use_listings_cache", False)
    return options


# -- local copies of remote folders ----------------------------------------------------------------
def fs_for(url: str, storage: Storage | None = None):
    """Filesystem and path for ``url``; uses the storage's options (credentials, endpoint) for its protocol."""
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    same = storage is not None and "://" in storage.root and storage.root.split("://", 1)[0] == protocol
    return fsspec.core.url_to_fs(url, **_fs_options(url, storage.storage_options if same else {}))


def list_files(fs, root: str) -> dict[str, str]:
    """``{relative posix name: full path}`` of the files under ``root``, skipping dot-files and dot-folders."""
    root = root.rstrip("/")
    out = {}
    for full in fs.find(root):
        rel = full[len(root) + 1 :] if full.startswith(root + "/") else os.path.relpath(full, root)
        if not any(part.startswith(".") for part in rel.split("/")):
            out[rel] = full
    return dict(sorted(out.items()))


def is_weight(name: str) -> bool:
    """Whether ``name`` is a model weight file (by suffix), which a copy without weights skips."""
    return name.endswith(WEIGHT_SUFFIXES)


def loadable(name: str, storage: Storage | None = None, *, weights: bool = True) -> str | Path:
    """What ``from_pretrained`` takes for ``name``, a local folder, an fsspec URL or a hub id: a URL's
    :func:`local_copy` (its small files only, without ``weights``), an existing path with ``~``
    expanded, else ``name`` itself (a hub id). Raises FileNotFoundError for a URL that is no folder."""
    if "://" in name:
        return local_copy(name, storage, weights=weights)
    path = Path(name).expanduser()
    return path if path.exists() else name


def local_copy(url: str, storage: Storage | None = None, key: str | None = None, *, weights: bool = True) -> Path:
    """Local cached copy of the folder at fsspec ``url``, in ``<cache>/<key>``; returns that folder.

    The cache is ``$DISTILLERY_CACHE``, else ``~/.cache/distillery``. ``key`` names the copy (a folder
    relative to the cache) and must change when the contents do, e.g. ``teachers/<fingerprint>``; by
    default it is ``copies/<hash of the URL and every file's size and modification time or ETag>``.
    Without ``weights`` only the small files (config, tokenizer) are fetched. ``storage`` lends its
    options (credentials, endpoint) when ``url`` has its protocol. Raises FileNotFoundError when
    ``url`` is not a folder.
    """
    fs, root = fs_for(url, storage)
    if not fs.isdir(root):
        raise FileNotFoundError(f"folder {url} does not exist")
    if key is None:
        listing = {rel: fs.info(full) for rel, full in list_files(fs, root).items()}
        key = "copies/" + fingerprint({"url": url, "files": listing})
    cache = os.environ.get("DISTILLERY_CACHE") or Path.home() / ".cache" / "distillery"
    return _download(fs, root, Path(cache) / key, weights=weights)


def _download(fs, root: str, dest: Path, *, weights: bool) -> Path:
    """Copy the folder at ``root`` (only its non-weight files unless ``weights``) into ``dest``, once.

    Each file is written under a temporary name and renamed; a ``.complete-{all,meta}`` flag written
    after the files makes an interrupted download redo itself.
    """
    flag = dest / (".complete-all" if weights else ".complete-meta")
    if flag.exists() or (dest / ".complete-all").exists():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    for rel, full in list_files(fs, root).items():
        if weights or not is_weight(rel):
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f"{target.name}.tmp-{uuid.uuid4().hex[:8]}")
            fs.get_file(full, str(tmp))
            os.replace(tmp, target)
    flag.write_text("")
    return dest
