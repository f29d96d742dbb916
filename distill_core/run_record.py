"""The record of one run: its resolved config and each finished stage's output, under runs/<run_id>/.

Stages pass small JSON values (refs to data, caches, models), never tensors; a stage run alone on
a run id reads its inputs from here. ``runs/<run_id>/.lock`` (:class:`RunLock`) is held while a flow
works on the run, so two runs on one run id never interleave.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import socket
import uuid
from typing import Any

from distill_core.cache.shards import MANIFEST
from distill_core.config import RunConfig, TrainConfig
from distill_core.errors import CacheError, ConfigError, RunLockedError
from distill_core.storage import Storage

RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def new_run_id(cfg: RunConfig) -> str:
    return f"{cfg.registry.name}-{dt.datetime.now(dt.timezone.utc):%Y%m%d-%H%M%S}"


class RunRecord:
    def __init__(self, storage: Storage, run_id: str):
        if not RUN_ID.match(run_id):
            raise ConfigError(f"run id {run_id!r} is invalid: use letters, digits, '.', '_' and '-' (at most 128).")
        self.storage, self.run_id = storage, run_id
        self.folder = f"runs/{run_id}"

    def save_config(self, cfg: RunConfig) -> None:
        self.storage.write_json(f"{self.folder}/config.json", cfg.model_dump(mode="json"))

    def load_config(self) -> RunConfig:
        if not self.storage.exists(f"{self.folder}/config.json"):
            raise ConfigError(f"run {self.run_id} has no record under {self.storage.url(self.folder)}: check the run id.")
        return RunConfig.model_validate(self.storage.read_json(f"{self.folder}/config.json"))

    def write_stage(self, stage: str, output: Any) -> None:
        self.storage.write_json(f"{self.folder}/stages/{stage}.json", output)

    def has_stage(self, stage: str) -> bool:
        return self.storage.exists(f"{self.folder}/stages/{stage}.json")

    def read_stage(self, stage: str) -> Any:
        """A finished stage's output; refuses a stage that has not finished and one whose recorded
        data or cache folder has been deleted since, each with the command that fixes it."""
        writer = WRITTEN_BY.get(stage, stage)
        flags = ""
        if (m := re.fullmatch(r"((?:sample|train)_round)_(\d+)", stage)):  # a round's stages: one record per round
            writer, flags = m[1], f" --round {m[2]}"
        if not self.has_stage(stage):
            raise ConfigError(
                f"stage {stage!r} has not finished for run {self.run_id}: run {writer} first "
                f"(distillery stage {writer} CONFIG --run-id {self.run_id}{flags})."
            )
        output = self.storage.read_json(f"{self.folder}/stages/{stage}.json")
        gone = [rel for rel in _committed_files(stage, output) if not self.storage.exists(rel)]
        if gone:
            raise CacheError(
                f"stage {writer!r} finished for run {self.run_id} ({self.storage.url(self.folder)}/stages/{stage}.json), "
                f"but its output was deleted since: {self.storage.url(gone[0])} is gone. Run it again with "
                f"--refresh-cache, so that Prefect's task cache does not return the deleted result "
                f"(distillery stage {writer} CONFIG --run-id {self.run_id}{flags} --refresh-cache), then this stage."
            )
        return output

    def read_caches(self, train: TrainConfig) -> dict[str, Any]:
        """{kind: CacheRef dict} for every teacher cache the run's loss terms train on."""
        return {kind: self.read_stage(f"cache_{kind}") for kind in train.caches()}


# Stage records written by a stage of another name (the CLI and the deployments know stages by the writer).
WRITTEN_BY = {"teacher": "prepare_data"}


def _committed_files(stage: str, output: Any) -> list[str]:
    """The manifests a stage's recorded output points at (relative to the root): data and teacher caches."""
    if stage == "prepare_data":
        return [f"{output['folder']}/{split}/{MANIFEST}" for split in ("train", "validation")]
    if stage.startswith("cache_"):
        return [f"{output['folder']}/{MANIFEST}"]
    if stage.startswith("sample_round_"):
        return [f"{output['cache']['folder']}/{MANIFEST}"]
    return []


class RunLock:
    """Exclusive ``runs/<run_id>/.lock`` with its holder's identity; a second holder fails fast.

    Local roots create the file with ``O_CREAT | O_EXCL`` (atomic). Object stores use
    ``Storage.write_new`` (check, then PUT): it catches a second run unless both start within the
    same few milliseconds. A lock left by a killed process on this host (its pid no longer exists)
    is taken over; any other held lock raises :class:`RunLockedError` naming the file and the fix.
    """

    def __init__(self, storage: Storage, run_id: str, owner: dict[str, Any] | None = None):
        self.record = RunRecord(storage, run_id)  # validates the run id
        self.storage, self.run_id = storage, run_id
        self.rel = f"{self.record.folder}/.lock"
        self.url = storage.url(self.rel)
        self.holder = {
            **(owner or {}), "host": socket.gethostname(), "pid": os.getpid(),
            "since": dt.datetime.now(dt.timezone.utc).isoformat(), "token": uuid.uuid4().hex,
        }

    def acquire(self) -> "RunLock":
        if self._try_create():
            return self
        found = self.read_holder()
        if found is not None and _stale(found) and self.read_holder() == found:
            self.storage.remove(self.rel)
            if self._try_create():
                return self
            found = self.read_holder()
        raise RunLockedError(
            f"run {self.run_id!r} is already in use: {self.url} is held by {_describe(found)}. "
            f"Wait for that run to finish, or use another run id; if no run is working on {self.run_id!r} "
            f"(it was killed on another machine), delete {self.url} and start again."
        )

    def release(self) -> None:
        """Remove the lock if this holder still owns it (never another run's lock)."""
        found = self.read_holder()
        if found is not None and found.get("token") == self.holder["token"]:
            self.storage.remove(self.rel)

    def read_holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.storage.read_bytes(self.rel))
        except FileNotFoundError:
            return None
        except ValueError:
            return {}  # half-written by a killed process: held by an unknown owner

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.release()
        except Exception as release_error:
            if exc is None:
                raise
            # The run's own error is the one to report (e.g. storage went away mid-stage); the lock
            # file stays, and the next run's message names it and how to clear it.
            logging.getLogger(__name__).warning(
                "could not release %s after run %s failed (%s); delete it before rerunning", self.url, self.run_id, release_error
            )

    def _try_create(self) -> bool:
        return self.storage.create_exclusive(self.rel, json.dumps(self.holder, sort_keys=True).encode())


def _stale(holder: dict[str, Any]) -> bool:
    """True when the holder ran on this host and its process is gone (killed before releasing)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, owned by another user
    return False


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "an unknown owner"
    parts = [f"{k} {holder[k]}" for k in ("flow_run_name", "flow_run_id", "host", "pid", "since") if holder.get(k)]
    return ", ".join(parts) or "an unknown owner"
