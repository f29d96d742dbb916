"""Where a stage's tasks run and where Prefect keeps their results, chosen from the run config.

``configured(stage_flow, config)`` is how the nightly flow and the CLI call a stage: teacher stages
(which map one task per shard) get the configured task runner, and every stage persists task
results under the storage root when that root is remote, so workers on other machines share them.
"""

from __future__ import annotations

from typing import Any

from prefect import Flow
from prefect.filesystems import RemoteFileSystem
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from distill_core.config import RunConfig, RunnerConfig, StorageConfig
from distill_core.errors import ConfigError
from distill_core.storage import Storage, fingerprint

# Stage flows that map per-shard tasks; the others call their tasks one after another, and starting
# a cluster for them would cost time for nothing.
SHARDED_STAGES = {"cache-topk", "cache-samples", "cache-beams"}
RESULTS_FOLDER = "prefect-results"
CREDENTIAL_OPTIONS = {"key", "secret", "token", "username", "password"}  # s3fs names; never saved in a block


def task_runner(cfg: RunnerConfig) -> TaskRunner:
    """The Prefect task runner for ``cfg``: a thread pool, a Dask cluster (local or at ``address``) or Ray."""
    if cfg.kind == "threads":
        return ThreadPoolTaskRunner(max_workers=cfg.workers)
    if cfg.kind == "dask":
        DaskTaskRunner = _import("prefect_dask", "DaskTaskRunner", "scale")
        if cfg.address:
            return DaskTaskRunner(address=cfg.address)
        # One thread per worker: a worker computes one shard at a time, and torch uses the cores.
        return DaskTaskRunner(cluster_kwargs={
            "n_workers": cfg.workers, "threads_per_worker": 1, "processes": cfg.processes,
        })
    if cfg.kind == "ray":
        RayTaskRunner = _import("prefect_ray", "RayTaskRunner", "ray")
        if cfg.address:
            return RayTaskRunner(address=cfg.address)
        return RayTaskRunner(init_kwargs={"num_cpus": cfg.workers})
    raise ConfigError(f"runner.kind {cfg.kind!r} is unknown: use threads, dask or ray.")


def result_storage(cfg: StorageConfig) -> RemoteFileSystem | None:
    """Prefect result storage beside the artifacts (``<root>/prefect-results``) when the root is remote.

    None for a local root: Prefect's default local result storage serves one machine. Prefect takes
    only saved blocks, so this saves (or updates) a ``remote-file-system`` block named after the
    root. The block keeps no credentials: they are left out of its settings (Prefect stores block
    settings in its database), and s3fs finds them by the standard AWS chain where each task runs."""
    storage = Storage(cfg.root, cfg.options)
    if storage.is_local:
        return None
    settings = {k: v for k, v in cfg.options.items() if k not in CREDENTIAL_OPTIONS}
    if isinstance(settings.get("client_kwargs"), dict):
        settings["client_kwargs"] = {k: v for k, v in settings["client_kwargs"].items() if not k.startswith("aws_")}
    block = RemoteFileSystem(basepath=storage.url(RESULTS_FOLDER), settings=settings)
    block.save(f"distillery-results-{fingerprint(block.basepath)}", overwrite=True)
    return block


def configured(stage: Flow, config: RunConfig) -> Flow:
    """``stage`` with the task runner (teacher stages only) and result storage that ``config`` asks for."""
    options: dict[str, Any] = {}
    if stage.name in SHARDED_STAGES:
        options["task_runner"] = task_runner(config.runner)
    if (storage := result_storage(config.storage)) is not None:
        options["result_storage"] = storage
    return stage.with_options(**options) if options else stage


def _import(module: str, name: str, extra: str):
    import importlib

    try:
        return getattr(importlib.import_module(module), name)
    except ImportError:
        raise ConfigError(
            f"runner.kind needs the {module} package: pip install 'distillery[{extra}]' (or {module.replace('_', '-')})."
        ) from None
