"""A file model registry on the storage root: numbered, immutable versions plus movable aliases.

Layout under the root::

    registry/<name>/.lock               held while a register or set_alias runs
    registry/<name>/<version>/          a Hugging Face model folder (safetensors, config.json,
                                        generation_config.json, tokenizer files, README.md card)
    registry/<name>/<version>/entry.json   metrics, lineage, config, file hashes; written LAST
    registry/<name>/index.json          committed versions (version, created_at, metrics, path)
    registry/<name>/aliases.json        {"champion": 3, ...}

``entry.json`` is the commit marker: a version folder without it is not a version (a killed
upload), and the next register removes it and reuses its number. ``entry.json`` is written with
``Storage.write_new`` and never overwritten. ``index.json`` is derived: every register rebuilds
it from the committed entries, so it heals after a crash between the entry and the index.

Concurrency: registers and alias changes on one model hold ``registry/<name>/.lock``. On a local
root the lock is created with ``O_CREAT | O_EXCL`` (atomic). On an object store it is created
with ``write_new`` (check, then PUT): this serialises writers except in a race of a few
milliseconds, and ``write_new`` of ``entry.json`` is the final guard, so two writers never both
commit one version number (the loser gets :class:`RegistryError`). A killed process leaves the
lock behind; the next writer waits ``lock_timeout`` seconds and then fails with a message saying
which file to delete.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import re
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from distill_core.errors import RegistryError
from distill_core.storage import Storage, sha256_bytes
from distill_core.version import CODE_VERSION

SCHEMA_VERSION = 1
ROOT = "registry"
ENTRY = "entry.json"
INDEX = "index.json"
ALIASES = "aliases.json"
LOCK = ".lock"
CHAMPION = "champion"
LOCK_TIMEOUT_S = 300.0  # long enough for another register to upload a large model

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: int
    url: str
    champion: bool  # whether this version holds the champion alias after the register
    previous_champion: int | None  # the champion before the register (None when there was none)


# -- public API ---------------------------------------------------------------------------------
def register(
    storage: Storage,
    name: str,
    model,
    tokenizer,
    *,
    metrics: dict[str, Any],
    lineage: dict[str, Any],
    config: dict[str, Any],
    primary_metric: str = "val_ppl",
    lower_is_better: bool = True,
    lock_timeout: float = LOCK_TIMEOUT_S,
    link_from: str | None = None,
) -> RegisteredVersion:
    """Save ``model`` and ``tokenizer`` as the next version of ``name``; move ``champion`` if it wins.

    ``link_from``: the folder of this storage the model was loaded from; files the version shares with
    it byte for byte are hard-linked on a local root (see :meth:`Storage.upload_dir`).

    ``lineage`` holds teacher, data_fingerprint, cache_ids, flow_run_id, code_version (any other
    keys are kept too). The champion alias moves only when ``metrics[primary_metric]`` is strictly
    better than the champion's value for the same metric, or when there is no champion.
    """
    value = check_registration(name, metrics, primary_metric)
    lineage = {"code_version": CODE_VERSION, **lineage}

    with _Lock(storage, name, lock_timeout):
        version = _next_version(storage, name)
        folder = _version_rel(name, version)
        # Decide the champion before the upload so a broken alias fails before the expensive part.
        aliases = _read_aliases(storage, name)
        previous = aliases.get(CHAMPION)
        wins = previous is None or _beats(
            value, _read_entry(storage, name, previous)["metrics"].get(primary_metric), lower_is_better
        )

        created_at = dt.datetime.now(dt.timezone.utc).isoformat()
        entry = {
            "schema_version": SCHEMA_VERSION,
            "name": name,
            "version": version,
            "created_at": created_at,
            "path": folder,
            "metrics": metrics,
            "primary_metric": primary_metric,
            "lower_is_better": lower_is_better,
            "lineage": lineage,
            "config": config,
        }
        with tempfile.TemporaryDirectory(prefix="distillery-register-") as tmp:
            _save_hf_folder(model, tokenizer, Path(tmp))
            card = model_card(name, version, storage.url(folder), metrics, lineage, config, primary_metric)
            (Path(tmp) / "README.md").write_text(card, encoding="utf-8")
            entry["files"] = _file_hashes(Path(tmp))
            if storage.exists(f"{folder}/{ENTRY}"):  # never clear a committed version
                raise _immutable(storage, name, version)
            storage.remove(folder, recursive=True)  # leftovers of a killed register (no entry.json)
            storage.upload_dir(tmp, folder, link_from=link_from)
        try:
            storage.write_new(f"{folder}/{ENTRY}", _json_bytes(entry))
        except FileExistsError:
            raise _immutable(storage, name, version) from None

        _write_index(storage, name)
        if wins:
            storage.write_json(_model_rel(name, ALIASES), {**aliases, CHAMPION: version})
    return RegisteredVersion(name, version, storage.url(folder), wins, previous)


def check_registration(name: str, metrics: dict[str, Any], primary_metric: str) -> float:
    """Refuse a bad model name or a missing/non-finite primary metric before any work; returns the metric."""
    _check_name(name, "model name")
    value = metrics.get(primary_metric)
    if not _is_number(value):
        raise RegistryError(
            f"metrics[{primary_metric!r}] must be a finite number to rank versions, got {value!r}; "
            f"metrics have {sorted(metrics)}. Pass the metric or choose another primary_metric."
        )
    return value


def list_models(storage: Storage) -> list[str]:
    """Names of models with at least one committed version."""
    return [n for n in storage.listdir(ROOT) if storage.exists(_model_rel(n, INDEX))]


def list_versions(storage: Storage, name: str) -> list[dict[str, Any]]:
    """Committed versions of ``name``, oldest first: version, created_at, metrics, path."""
    _require_model(storage, name)
    return storage.read_json(_model_rel(name, INDEX))["versions"]


def get_version(storage: Storage, name: str, version_or_alias: int | str) -> dict[str, Any]:
    """The ``entry.json`` of a version, given its number (``3`` or ``"3"``) or an alias."""
    _require_model(storage, name)
    return _read_entry(storage, name, _resolve(storage, name, version_or_alias))


def resolve_path(storage: Storage, name: str, version_or_alias: int | str) -> str:
    """URL (or absolute local path) of a version's model folder; ``from_pretrained`` takes a local one."""
    return storage.url(get_version(storage, name, version_or_alias)["path"])


def list_aliases(storage: Storage, name: str) -> dict[str, int]:
    _require_model(storage, name)
    return _read_aliases(storage, name)


def find_by_lineage(storage: Storage, name: str, key: str, value: Any) -> RegisteredVersion | None:
    """The committed version whose ``lineage[key]`` equals ``value`` (e.g. the same trained student), else None.

    Lets a rerun of a finished pipeline return the version it registered instead of adding a copy."""
    if not storage.exists(_model_rel(name, INDEX)):
        return None
    champion = _read_aliases(storage, name).get(CHAMPION)
    for version in _committed_versions(storage, name):
        entry = _read_entry(storage, name, version)
        if entry["lineage"].get(key) == value:
            return RegisteredVersion(name, version, storage.url(entry["path"]), champion == version, None)
    return None


def set_alias(
    storage: Storage, name: str, alias: str, version: int, *, lock_timeout: float = LOCK_TIMEOUT_S
) -> int | None:
    """Point ``alias`` at a committed ``version`` (manual promotion); returns the previous target."""
    _check_name(alias, "alias")
    if alias.isdigit():
        raise RegistryError(f"alias {alias!r} is all digits and would shadow a version number; use a word.")
    _require_model(storage, name)
    with _Lock(storage, name, lock_timeout):
        _read_entry(storage, name, int(version))
        aliases = _read_aliases(storage, name)
        previous = aliases.get(alias)
        storage.write_json(_model_rel(name, ALIASES), {**aliases, alias: int(version)})
    return previous


def model_card(
    name: str,
    version: int,
    url: str,
    metrics: dict[str, Any],
    lineage: dict[str, Any],
    config: dict[str, Any],
    primary_metric: str,
) -> str:
    """Markdown README for a version: metrics, lineage, the resolved config and how to load it."""
    lineage = dict(lineage)
    known = [
        ("Teacher", lineage.pop("teacher", None)),
        ("Data fingerprint", lineage.pop("data_fingerprint", None)),
        ("Cache ids", lineage.pop("cache_ids", None)),
        ("Flow run id", lineage.pop("flow_run_id", None)),
        ("Code version", lineage.pop("code_version", None)),
    ]
    known += [(key, value) for key, value in sorted(lineage.items())]
    metric_rows = [
        f"| {key}{' (primary)' if key == primary_metric else ''} | {_fmt(value)} |"
        for key, value in sorted(metrics.items())
    ]
    lineage_rows = [f"- **{label}**: {_fmt_lineage(value)}" for label, value in known]
    config_yaml = yaml.safe_dump(_plain(config), sort_keys=True, default_flow_style=False).rstrip()
    return "\n".join([
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [distillation, distillery]",
        "---",
        "",
        f"# {name} v{version}",
        "",
        f"A student distilled by distillery, registered as version {version} of `{name}`.",
        "",
        "## Metrics",
        "",
        "| metric | value |",
        "| --- | --- |",
        *metric_rows,
        "",
        "## Lineage",
        "",
        *lineage_rows,
        "",
        "## Config",
        "",
        "```yaml",
        config_yaml,
        "```",
        "",
        "## Load",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'path = "{url}"',
        "model = AutoModelForCausalLM.from_pretrained(path)",
        "tokenizer = AutoTokenizer.from_pretrained(path)",
        "```",
        "",
        "For an object-store root, copy the folder to disk first, e.g. "
        f"`Storage(root).download_dir(\"{ROOT}/{name}/{version}\", \"./{name}-v{version}\")`.",
        "",
    ])


# -- internals ----------------------------------------------------------------------------------
def _model_rel(name: str, *parts: str) -> str:
    return "/".join([ROOT, name, *parts])


def _version_rel(name: str, version: int) -> str:
    return _model_rel(name, str(version))


def _check_name(value: str, what: str) -> None:
    if not isinstance(value, str) or not _NAME.match(value):
        raise RegistryError(
            f"{what} {value!r} is not allowed: use letters, digits, '.', '_' or '-', starting with a "
            "letter or digit."
        )


def _committed_versions(storage: Storage, name: str) -> list[int]:
    """Version numbers whose folder holds entry.json (the commit marker), ascending."""
    numbers = sorted(int(n) for n in storage.listdir(_model_rel(name)) if n.isdigit())
    return [v for v in numbers if storage.exists(f"{_version_rel(name, v)}/{ENTRY}")]


def _next_version(storage: Storage, name: str) -> int:
    committed = _committed_versions(storage, name)
    return committed[-1] + 1 if committed else 1


def _require_model(storage: Storage, name: str) -> None:
    if not storage.exists(_model_rel(name, INDEX)):
        models = list_models(storage)
        raise RegistryError(
            f"no model {name!r} in the registry at {storage.url(ROOT)}; "
            f"models: {', '.join(models) if models else '(none registered yet)'}."
        )


def _read_aliases(storage: Storage, name: str) -> dict[str, int]:
    rel = _model_rel(name, ALIASES)
    return storage.read_json(rel) if storage.exists(rel) else {}


def _resolve(storage: Storage, name: str, version_or_alias: int | str) -> int:
    if isinstance(version_or_alias, int):
        return version_or_alias
    if isinstance(version_or_alias, str) and version_or_alias.isdigit():
        return int(version_or_alias)
    aliases = _read_aliases(storage, name)
    if version_or_alias not in aliases:
        known = ", ".join(f"{a} -> v{v}" for a, v in sorted(aliases.items())) or "(none)"
        raise RegistryError(f"model {name!r} has no alias {version_or_alias!r}; aliases: {known}.")
    return int(aliases[version_or_alias])


def _read_entry(storage: Storage, name: str, version: int) -> dict[str, Any]:
    rel = f"{_version_rel(name, version)}/{ENTRY}"
    if not storage.exists(rel):
        versions = ", ".join(str(v) for v in _committed_versions(storage, name)) or "(none)"
        raise RegistryError(f"model {name!r} has no version {version}; versions: {versions}.")
    return storage.read_json(rel)


def _write_index(storage: Storage, name: str) -> None:
    """Rebuild index.json from the committed entries (so a crash before the index write heals)."""
    versions = []
    for v in _committed_versions(storage, name):
        entry = storage.read_json(f"{_version_rel(name, v)}/{ENTRY}")
        versions.append({
            "version": v,
            "created_at": entry["created_at"],
            "metrics": {k: m for k, m in entry["metrics"].items() if _is_number(m)},
            "path": entry["path"],
        })
    storage.write_json(
        _model_rel(name, INDEX), {"schema_version": SCHEMA_VERSION, "name": name, "versions": versions}
    )


def _immutable(storage: Storage, name: str, version: int) -> RegistryError:
    return RegistryError(
        f"version {version} of {name!r} already exists at {storage.url(_version_rel(name, version))} and is "
        "immutable; another register committed it first. Register again to get the next version."
    )


def _save_hf_folder(model, tokenizer, folder: Path) -> None:
    # transformers 4.x defaults to safetensors and 5.x only writes safetensors; check, not trust.
    model.save_pretrained(folder)
    if not any(folder.glob("*.safetensors")):
        raise RegistryError(f"save_pretrained wrote no .safetensors file in {folder}; cannot register.")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _file_hashes(folder: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = file.read_bytes()
        out[file.relative_to(folder).as_posix()] = {"bytes": len(data), "sha256": sha256_bytes(data)}
    return out


def _beats(new: float, current: Any, lower_is_better: bool) -> bool:
    # A champion without a comparable value keeps the alias: only set_alias moves it then.
    if not _is_number(current):
        return False
    return new < current if lower_is_better else new > current


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=True, default=str).encode()


def _plain(obj: Any) -> Any:
    """JSON round trip: paths, enums and the like become strings so YAML stays plain."""
    return json.loads(json.dumps(obj, default=str))


def _fmt(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _fmt_lineage(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (list, tuple)):
        return ", ".join(f"`{v}`" for v in value) or "n/a"
    if isinstance(value, dict):
        return ", ".join(f"{k}: `{v}`" for k, v in sorted(value.items())) or "n/a"
    return f"`{value}`"


class _Lock:
    """Exclusive ``registry/<name>/.lock`` (see the module docstring for its guarantees)."""

    def __init__(self, storage: Storage, name: str, timeout: float):
        self.storage = storage
        self.rel = _model_rel(name, LOCK)
        self.timeout = timeout

    def __enter__(self) -> _Lock:
        holder = _json_bytes({
            "host": socket.gethostname(), "pid": os.getpid(),
            "since": dt.datetime.now(dt.timezone.utc).isoformat(),
        })
        deadline = time.monotonic() + self.timeout
        delay = 0.05
        while True:
            if self._try_create(holder):
                return self
            if time.monotonic() >= deadline:
                raise RegistryError(
                    f"registry lock {self.storage.url(self.rel)} is still held after {self.timeout:g} s "
                    f"(holder: {self._holder()}). If no register is running, delete that file and retry."
                )
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def __exit__(self, *exc) -> None:
        self.storage.remove(self.rel)

    def _try_create(self, holder: bytes) -> bool:
        return self.storage.create_exclusive(self.rel, holder)

    def _holder(self) -> str:
        try:
            return json.dumps(json.loads(self.storage.read_bytes(self.rel)), sort_keys=True)
        except (OSError, ValueError):
            return "unknown"
