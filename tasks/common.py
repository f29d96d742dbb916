"""What every task shares: the storage root, content-keyed caching, progress artifacts."""

from __future__ import annotations

import re
from typing import Callable

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import INPUTS, TASK_SOURCE

from distill_core.config import StorageConfig
from distill_core.storage import Storage

# A task's result is reused when its inputs (stage config + input refs, which carry fingerprints)
# and its source code are unchanged.
CONTENT = INPUTS + TASK_SOURCE


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
