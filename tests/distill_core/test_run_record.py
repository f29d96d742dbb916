import json
import socket
import subprocess

import pytest

from distill_core.errors import ConfigError, RunLockedError
from distill_core.run_record import RunLock
from distill_core.storage import Storage


@pytest.fixture
def storage(tmp_path):
    return Storage(str(tmp_path))


def test_second_holder_fails_fast_naming_the_lock_file_and_the_fix(storage):
    first = RunLock(storage, "r1", owner={"flow_run_name": "nightly-a"}).acquire()
    lock = storage.url("runs/r1/.lock")
    with pytest.raises(RunLockedError, match=rf"run 'r1' is already in use: {lock} is held by flow_run_name nightly-a.*"
                                             rf"Wait for that run to finish.*delete {lock}"):
        RunLock(storage, "r1").acquire()
    RunLock(storage, "r2").acquire().release()  # other run ids are free
    first.release()
    assert not storage.exists("runs/r1/.lock")


def test_release_never_removes_another_holders_lock(storage):
    first = RunLock(storage, "r1").acquire()
    RunLock(storage, "r1").release()
    assert json.loads(storage.read_bytes("runs/r1/.lock"))["token"] == first.holder["token"]


def test_context_manager_releases_on_error(storage):
    with pytest.raises(ValueError):
        with RunLock(storage, "r1"):
            raise ValueError("stage failed")
    assert not storage.exists("runs/r1/.lock")


def test_lock_of_a_killed_process_on_this_host_is_taken_over(storage):
    dead = subprocess.Popen(["true"])
    dead.wait()
    storage.write_json("runs/r1/.lock", {"host": socket.gethostname(), "pid": dead.pid, "token": "old"})
    with RunLock(storage, "r1") as lock:
        assert json.loads(storage.read_bytes("runs/r1/.lock"))["token"] == lock.holder["token"]


@pytest.mark.parametrize("holder", [
    {"host": "another-machine", "pid": 1, "token": "x"},  # cannot tell whether it is alive: keep it
    "{half written",
])
def test_other_locks_are_respected(storage, holder):
    data = holder.encode() if isinstance(holder, str) else json.dumps(holder).encode()
    storage.write_bytes("runs/r1/.lock", data)
    with pytest.raises(RunLockedError, match="already in use"):
        RunLock(storage, "r1").acquire()
    assert storage.read_bytes("runs/r1/.lock") == data


def test_bad_run_id_is_refused(storage):
    with pytest.raises(ConfigError, match="run id"):
        RunLock(storage, "../escape")


def test_lock_on_s3(s3_storage):
    with RunLock(s3_storage, "r1"):
        with pytest.raises(RunLockedError, match=r"s3://.*/runs/r1/\.lock"):
            RunLock(s3_storage, "r1").acquire()
    assert not s3_storage.exists("runs/r1/.lock")


def test_a_stage_record_names_the_cli_stage_that_writes_it(storage):
    from distill_core.run_record import RunRecord

    with pytest.raises(ConfigError, match=r"stage 'teacher' has not finished for run r1: run prepare_data first "
                                          r"\(distillery stage prepare_data CONFIG --run-id r1\)"):
        RunRecord(storage, "r1").read_stage("teacher")
    with pytest.raises(ConfigError, match=r"run cache_topk first \(distillery stage cache_topk CONFIG"):
        RunRecord(storage, "r1").read_stage("cache_topk")


def test_a_finished_stage_whose_output_was_deleted_says_refresh_cache(storage):
    from distill_core.errors import CacheError
    from distill_core.run_record import RunRecord

    record = RunRecord(storage, "r1")
    record.write_stage("prepare_data", {"folder": "data/fp"})
    storage.write_json("data/fp/train/manifest.json", {})
    storage.write_json("data/fp/validation/manifest.json", {})
    assert record.read_stage("prepare_data") == {"folder": "data/fp"}
    storage.remove("data/fp/train/manifest.json")
    with pytest.raises(CacheError, match=r"stage 'prepare_data' finished for run r1 .*but its output was deleted since: "
                                         r".*data/fp/train/manifest.json is gone.*"
                                         r"distillery stage prepare_data CONFIG --run-id r1 --refresh-cache"):
        record.read_stage("prepare_data")
    record.write_stage("cache_topk", {"folder": "caches/topk/fp"})
    with pytest.raises(CacheError, match=r"stage 'cache_topk' finished.*caches/topk/fp/manifest.json is gone"):
        record.read_stage("cache_topk")
