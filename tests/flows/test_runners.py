import pytest
from prefect.task_runners import ThreadPoolTaskRunner
from prefect_dask import DaskTaskRunner

from distill_core.config import RunConfig, RunnerConfig, StorageConfig, parse_config
from distill_core.errors import ConfigError
from flows.runners import configured, result_storage, task_runner
from flows.stages import cache_topk_flow, train_flow
from tasks.teacher import GPU_TAG, cache_shard


def test_runner_kinds():
    threads = task_runner(RunnerConfig())
    assert isinstance(threads, ThreadPoolTaskRunner) and threads._max_workers == 1
    remote = task_runner(RunnerConfig(kind="dask", address="tcp://scheduler:8786"))
    assert isinstance(remote, DaskTaskRunner) and remote.address == "tcp://scheduler:8786"
    local = task_runner(RunnerConfig(kind="dask", workers=3))
    assert local.address is None and local.cluster_kwargs["n_workers"] == 3
    with pytest.raises(ConfigError, match="runner.kind"):
        parse_config({"runner": {"kind": "spark"}})


def test_ray_without_prefect_ray_says_what_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name.startswith("prefect_ray"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(ConfigError, match=r"distillery\[ray\]"):
        task_runner(RunnerConfig(kind="ray"))


def test_only_teacher_stages_get_the_runner_and_local_roots_keep_local_results(tmp_path):
    config = RunConfig(storage=StorageConfig(root=str(tmp_path)), runner=RunnerConfig(kind="dask", address="tcp://s:8786"))
    assert result_storage(config.storage) is None
    assert isinstance(configured(cache_topk_flow, config).task_runner, DaskTaskRunner)
    assert configured(train_flow, config) is train_flow


def test_remote_root_saves_a_result_storage_block_without_credentials(s3_server):
    options = {"endpoint_url": s3_server, "key": "testing", "secret": "testing"}
    block = result_storage(StorageConfig(root="s3://bucket/prefix", options=options))
    assert block.basepath == "s3://bucket/prefix/prefect-results"
    assert block.settings == {"endpoint_url": s3_server}
    assert block._block_document_id is not None  # saved: Prefect takes only saved result storage


def test_shard_tasks_carry_the_gpu_concurrency_tag():
    assert GPU_TAG in cache_shard.tags


def test_flows_and_tasks_pickle_for_distributed_runners():
    """Dask and Ray pickle the running flow (by value) into every task's context: a module-level lock
    or ContextVar named by flow or task code breaks them."""
    import cloudpickle

    from flows.nightly import nightly
    from flows.stages import STAGES
    from tasks.teacher import commit_cache, plan_cache

    for obj in [nightly, *STAGES.values(), cache_shard, plan_cache, commit_cache]:
        cloudpickle.dumps(obj)
