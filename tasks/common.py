"""What every task shares: the storage root, content-keyed caching, progress artifacts."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy

from distill_core.config import StorageConfig
from distill_core.errors import DistilleryError
from distill_core.storage import Storage

@dataclass
class StorageEpoch(CachePolicy):
    """Part of a key that changes when the task's storage root is deleted and started again: a cached
    result is a reference to files under the root, and must not outlive them."""

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> str | None:
        cfg = inputs.get("storage") or getattr(inputs.get("config"), "storage", None)
        return storage_of(cfg).epoch() if isinstance(cfg, StorageConfig) else None


# A task's result is reused when its inputs (stage config + input refs, which carry fingerprints),
# its source code and its storage root's lifetime are unchanged.
CONTENT = INPUTS + TASK_SOURCE + StorageEpoch()


def transient(task, task_run, state) -> bool:
    """Retry condition (``retry_condition_fn``) of every task with retries: retry what may pass
    (storage or network down), never a user error (a DistilleryError: config, data, teacher or cache
    problems), which fails the same way on every attempt and whose message already names the fix."""
    return not isinstance(state.data, DistilleryError)  # a task that raised fails with the exception as data


def storage_of(cfg: StorageConfig) -> Storage:
    return Storage(cfg.root, cfg.options)


def artifact_key(*parts: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


def progress_reporter(key: str, description: str) -> Callable[..., None]:
    """A callback (done, total, *extra) that updates one progress artifact in the Prefect UI."""
    artifact_id = create_progress_artifact(progress=0.0, key=artifact_key(key), description=description)

    def report(done: int, total: int, *_extra) -> None:
        update_progress_artifact(artifact_id=artifact_id, progress=100.0 * done / max(total, 1))

    return report
