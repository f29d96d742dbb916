"""The record of one run: its resolved config and each finished stage's output, under runs/<run_id>/.

Stages pass small JSON values (refs to data, caches, models), never tensors; a stage run alone on
a run id reads its inputs from here.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

from distill_core.config import RunConfig
from distill_core.errors import ConfigError
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
        if not self.has_stage(stage):
            raise ConfigError(
                f"stage {stage!r} has not finished for run {self.run_id}: run it first "
                f"(distillery stage {stage} CONFIG --run-id {self.run_id})."
            )
        return self.storage.read_json(f"{self.folder}/stages/{stage}.json")
