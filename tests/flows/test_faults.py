"""Fault injection under prefect_test_harness with the tiny teacher: each fault is survived.

(1) training fails at step N, ``prefect flow-run retry`` completes the same flow run; (2) the teacher
stage process is SIGKILLed mid-shard, the rerun computes only the missing shards; (3) two runs on
one run id; (4) a cache shard damaged on disk is refused, then recomputed on request.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    ArtifactFilterType,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterParentFlowRunId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.logging.handlers import APILogHandler
from prefect.testing.cli import invoke_and_assert
from safetensors.torch import load_file

import distill_core.checkpoints as checkpoints_module
import distill_core.teacher.topk as topk_module
from distill_core.errors import CacheError, RunLockedError
from distill_core.run_record import RunLock
from distill_core.storage import Storage
from flows.nightly import nightly
from flows.stages import cache_topk_flow, prepare_data_flow, train_flow
from tasks.train import FAIL_AT_STEP_ENV

REPO = Path(__file__).resolve().parents[2]
STAGE_FOLDERS = ("teachers/", "data/", "caches/")


def _files(root: Path, prefixes=("",)) -> dict[str, tuple[int, int]]:
    """{relative path: (mtime_ns, size)} of every file under ``root`` starting with one of ``prefixes``."""
    out = {}
    for p in root.rglob("*"):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel.startswith(prefixes):
            out[rel] = (p.stat().st_mtime_ns, p.stat().st_size)
    return out


def _subflow_runs(client, parent_id):
    return client.read_flow_runs(
        flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id]))
    )


# -- (1) training fails at step N; the flow run is retried ----------------------------------------------
def test_failed_training_is_completed_by_prefect_flow_run_retry(tiny_config, monkeypatch):
    root = Path(tiny_config.storage.root)
    resumed_at: list[tuple[str, int]] = []  # (student or baseline, step training started from)
    found: list[dict] = []  # the checkpoint files each training attempt found when it started
    real_resume = checkpoints_module.resume

    def spy_resume(student, optimizer, scheduler, storage, out):
        found.append(_files(root, (f"{out}/checkpoints/",)))
        start, history = real_resume(student, optimizer, scheduler, storage, out)
        resumed_at.append((out.rsplit("/", 1)[-1], start))
        return start, history

    monkeypatch.setattr(checkpoints_module, "resume", spy_resume)
    # checkpoint_every=2: a checkpoint at step 2, a failure after step 3 on every attempt, so the
    # task's own retry (which resumes at 2) fails as well and the flow run fails.
    monkeypatch.setenv(FAIL_AT_STEP_ENV, "3")
    state = nightly(tiny_config, run_id="retry-me", return_state=True)
    assert state.is_failed()
    assert resumed_at == [("student", 0), ("student", 2)]
    flow_run_id = state.state_details.flow_run_id
    stage_files = _files(root, STAGE_FOLDERS)
    checkpoints = {k: v for k, v in _files(root, ("students/",)).items() if "/checkpoints/" in k}
    assert any("checkpoints/step-000002/" in k for k in checkpoints)
    assert not (root / "runs/retry-me/.lock").exists()  # the failed run released its lock

    monkeypatch.delenv(FAIL_AT_STEP_ENV)
    with get_client(sync_client=True) as client:
        first_attempt = {r.id for r in _subflow_runs(client, flow_run_id)}
    invoke_and_assert(
        ["flow-run", "retry", str(flow_run_id), "--entrypoint", f"{REPO}/flows/nightly.py:nightly"],
        expected_output_contains="completed successfully", echo=False,
    )

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
        assert run.state.is_completed() and run.run_count == 2
        retried = [r for r in _subflow_runs(client, flow_run_id) if r.id not in first_attempt]
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[r.id for r in retried])))
        reports = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["report-tiny"])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
        )
        tables = client.read_artifacts(
            artifact_filter=ArtifactFilter(type=ArtifactFilterType(any_=["table"])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[r.id for r in retried])),
        )
        APILogHandler().flush()  # the logs reach the API in batches: send what is queued
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(
            any_=[r.id for r in _subflow_runs(client, flow_run_id)])))
    # the finished stages were not recomputed: their content-keyed tasks are Cached ...
    states = lambda prefix: {t.state.name for t in task_runs if t.name.startswith(prefix)}  # noqa: E731
    assert states("resolve-teacher-") == {"Cached"} and states("prepare-data-") == {"Cached"}
    assert not any(t.name.startswith("cache-topk-part") for t in task_runs)  # no teacher work
    # ... and their files are untouched
    assert _files(root, STAGE_FOLDERS) == stage_files
    # training resumed from its last checkpoint (step 2), the baseline started fresh
    assert resumed_at[2:] == [("student", 2), ("baseline", 0)]
    # the checkpoint it resumed from was untouched until the final model was committed, then deleted
    assert found[2] == checkpoints
    assert not [k for k in _files(root, ("students/",)) if "/checkpoints/" in k]

    # names say what runs: stage, teacher, student, data, date
    assert run.name.startswith("nightly-tiny_teacher") and "-to-tiny-on-embedded-" in run.name
    assert {r.name.split("-tiny_teacher")[0] for r in retried} >= {"prepare-data", "cache-topk", "train-student", "evaluate", "register"}

    # the report artifact of this run, keyed by model name
    assert len(reports) == 1  # created once, when the retried run finished
    markdown = reports[0].data
    assert "`retry-me`" in markdown and "| student |" in markdown and "bytes/token" in markdown
    assert "loss_curve.png" in markdown and "train-student" in markdown
    assert re.search(r"\| training loop \(student\) \| [0-9.]+ \| resumed from step 2 \|", markdown)
    # the loss curves are in the Markdown itself, as the PNGs beside the models
    trained = json.loads((root / "runs/retry-me/stages/train_student.json").read_text())
    for name in ("student", "baseline"):
        png = (root / trained[name]["model_folder"]).parent / "loss_curve.png"
        assert f"![{name} loss curve](data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()})" in markdown
    # each student's loss history is a table in the UI, with every loss term
    rows = {a.key.split("-")[1]: json.loads(a.data) for a in tables if a.key.startswith("loss-")}
    assert set(rows) == {"student", "baseline"}
    assert [r["step"] for r in rows["student"]] == [r["step"] for r in rows["baseline"]] == [1, 2, 3, 4, 5, 6]
    assert set(rows["student"][0]) == {"step", "lr", "loss", "forward_kl", "ce"} and set(rows["baseline"][0]) == {"step", "lr", "loss", "ce"}
    history = json.loads(((root / trained["student"]["model_folder"]) / "train.json").read_text())["result"]["history"]
    assert [r["loss"] for r in rows["student"]] == pytest.approx([h["loss"] for h in history], rel=1e-5)
    # and the task said that it resumed, in the run's log
    resumes = [log.message for log in logs if log.message.startswith("resuming ")]
    assert len(resumes) == 2 and all(re.fullmatch(r"resuming students/\w+/student from step 2 \(checkpoint .+/step-000002\)", m)
                                     for m in resumes)

    # the final weights equal those of an uninterrupted run: the train stage alone, on a copy of the
    # run without the students
    other = Path(str(root) + "-uninterrupted")
    shutil.copytree(root, other, ignore=shutil.ignore_patterns("students", "registry"))
    fresh_config = tiny_config.model_copy(update={"storage": tiny_config.storage.model_copy(update={"root": str(other)})})
    uninterrupted = train_flow(run_id="retry-me", config=fresh_config)
    resumed = json.loads((root / "runs/retry-me/stages/train_student.json").read_text())
    assert resumed["student"]["model_folder"] == uninterrupted["student"]["model_folder"]
    weights = lambda r: load_file(r / resumed["student"]["model_folder"] / "model.safetensors")  # noqa: E731
    a, b = weights(root), weights(other)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


# -- (2) the teacher stage process is killed mid-shard ------------------------------------------------
KILLED_STAGE = textwrap.dedent("""
    import os, signal, sys
    from distill_core.config import RunConfig
    from distill_core.data import DataRef
    from distill_core.run_record import RunRecord
    from distill_core.storage import Storage
    from distill_core.teacher.load import TeacherRef, load_teacher
    from distill_core.teacher.topk import cache_topk

    config, run_id = RunConfig.model_validate_json(sys.argv[1]), sys.argv[2]
    storage = Storage(config.storage.root)
    record = RunRecord(storage, run_id)
    teacher, data = record.read_stage("teacher"), DataRef.from_dict(record.read_stage("prepare_data"))
    model = load_teacher(TeacherRef.from_dict(teacher), storage)[0]
    finished = []
    forward = model.forward

    def forward_then_die(*args, **kwargs):
        if finished:  # the second shard's first forward pass: die mid-shard, no cleanup
            # ... once the background writer has recorded the first shard (it writes while this forward runs)
            import glob, time
            deadline = time.monotonic() + 60
            pattern = os.path.join(config.storage.root, "caches", "**", "*.commit.json")
            while not glob.glob(pattern, recursive=True) and time.monotonic() < deadline:
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGKILL)
        return forward(*args, **kwargs)

    model.forward = forward_then_die
    cache_topk(lambda: model, data, teacher, config.topk, storage, progress=lambda done, total: finished.append(done))
""")


def test_teacher_stage_killed_mid_shard_resumes_to_a_byte_identical_cache(tiny_config, monkeypatch):
    root = Path(tiny_config.storage.root)
    prepare_data_flow(run_id="killed", config=tiny_config)
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_STAGE, tiny_config.model_dump_json(), "killed"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    survivors = _files(root, ("caches/",))
    assert sum(k.endswith(".parquet") for k in survivors) == 1  # the first shard was written, the second was not

    computed = []
    real_table = topk_module._topk_table
    monkeypatch.setattr(topk_module, "_topk_table", lambda *a, **k: computed.append(1) or real_table(*a, **k))
    cache = cache_topk_flow(run_id="killed", config=tiny_config)
    assert len(computed) == 2  # only the two missing shards
    after = _files(root, ("caches/",))
    assert all(after[k] == v for k, v in survivors.items() if k.endswith(".parquet"))  # the survivor untouched

    # an uninterrupted run over the same data writes the same bytes
    other = Path(str(root) + "-uninterrupted")
    shutil.copytree(root, other, ignore=shutil.ignore_patterns("caches"))
    fresh = tiny_config.model_copy(update={"storage": tiny_config.storage.model_copy(update={"root": str(other)})})
    reference = cache_topk_flow(run_id="killed", config=fresh)
    assert reference["folder"] == cache["folder"]
    shards = sorted((root / cache["folder"]).glob("part-*.parquet"))
    assert len(shards) == 3
    for shard in shards:
        assert shard.read_bytes() == (other / cache["folder"] / shard.name).read_bytes()
    manifest = lambda r: json.loads((r / cache["folder"] / "manifest.json").read_text())["shards"]  # noqa: E731
    assert manifest(root) == manifest(other)


# -- (3) two runs on the same run id at once ----------------------------------------------------------
def test_second_run_on_a_busy_run_id_fails_fast_and_changes_nothing(tiny_config):
    root = Path(tiny_config.storage.root)
    first = RunLock(Storage(str(root)), "busy", owner={"flow_run_name": "the-first-run"}).acquire()
    before = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    lock = root / "runs/busy/.lock"

    for second in (lambda: nightly(tiny_config, run_id="busy", return_state=True),
                   lambda: train_flow(run_id="busy", config=tiny_config, return_state=True)):
        state = second()
        assert state.is_failed()
        with pytest.raises(RunLockedError, match=rf"{lock}.*the-first-run.*Wait for that run to finish.*delete {lock}"):
            state.result()
    after = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert after == before  # nothing written, and the first run still holds its lock

    first.release()
    prepare_data_flow(run_id="busy", config=tiny_config)  # once the first run is done, the run id is free again
    assert not lock.exists()


# -- (4) a cache shard damaged on disk -------------------------------------------------------------------
def test_damaged_cache_shard_is_refused_then_recomputed_on_request(tiny_config):
    root = Path(tiny_config.storage.root)
    prepare_data_flow(run_id="damaged", config=tiny_config)
    cache = cache_topk_flow(run_id="damaged", config=tiny_config)
    shards = sorted((root / cache["folder"]).glob("part-*.parquet"))
    original = {p.name: p.read_bytes() for p in shards}
    shards[0].write_bytes(original[shards[0].name][:-100])  # truncated
    edited = bytearray(original[shards[1].name])
    edited[len(edited) // 2] ^= 0xFF  # one byte edited, same size
    shards[1].write_bytes(bytes(edited))
    intact = shards[2].stat().st_mtime_ns

    state = train_flow(run_id="damaged", config=tiny_config, return_state=True)
    assert state.is_failed()
    with pytest.raises(CacheError, match=r"does not match its manifest checksum.*recompute_damaged=True.*repair-cache"):
        state.result()

    cache_topk_flow(run_id="damaged", config=tiny_config, recompute_damaged=True)
    assert {p.name: p.read_bytes() for p in shards} == original
    assert shards[2].stat().st_mtime_ns == intact  # an intact shard is not rewritten
    assert set(train_flow(run_id="damaged", config=tiny_config)) == {"student", "baseline"}
