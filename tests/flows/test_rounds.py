"""On-policy rounds as Prefect stages over the tiny teacher: two rounds, rerun, kill and resume, lineage."""

import json

import pytest
import torch
from safetensors.torch import load_file

from distill_core.errors import ConfigError
from distill_core.registry import get_version
from distill_core.report import gather, markdown_report
from distill_core.storage import Storage
from flows.nightly import nightly
from flows.stages import sample_round_flow, train_round_flow
from tasks.train import FAIL_AT_STEP_ENV


def _rounds_config(config, root):
    return config.model_validate(config.model_dump() | {
        "storage": {"root": str(root)},
        "student_samples": {"prompt_len": 8, "num_prompts": 8, "max_new_tokens": 6, "batch_size": 8},
        "train": config.train.model_dump() | {
            "losses": [{"name": "reverse_kl", "on": "student_samples"}, {"name": "ce"}],
            "steps": 6, "rounds": 2, "on_policy_fraction": 0.5, "checkpoint_every": 2,
        },
    })


def _files(root):
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def _stage(root, run_id, name):
    return json.loads((root / f"runs/{run_id}/stages/{name}.json").read_text())


def _final_weights(root, run_id):
    folder = _stage(root, run_id, "train_student")["student"]["model_folder"]
    return load_file(root / folder / "model.safetensors")


def test_two_rounds_then_a_rerun_recomputes_nothing(tiny_config, tmp_path):
    root = tmp_path / "root"
    config = _rounds_config(tiny_config, root)
    result = nightly(config, run_id="on-1")
    one, two = (_stage(root, "on-1", f"sample_round_{r}") for r in (1, 2))
    assert one["cache"]["folder"] != two["cache"]["folder"]  # round 2's student is round 1's trained one
    trained = [_stage(root, "on-1", f"train_round_{r}") for r in (1, 2)]
    assert two["cache"]["meta"]["student_fingerprint"] == trained[0]["student_fingerprint"]
    assert [t["result"]["steps"] for t in trained] == [3, 6]
    assert "generation_teacher_nll" in json.dumps(result["metrics"]["student"]) or "teacher_nll" in json.dumps(result["metrics"]["student"])
    lineage = get_version(Storage(str(root)), "tiny", 1)["lineage"]
    assert [r["cache"] for r in lineage["rounds"]] == [one["cache"]["folder"], two["cache"]["folder"]]
    assert lineage["rounds"][1]["sampled_by"] == lineage["rounds"][0]["student_fingerprint"]
    report = markdown_report(gather(Storage(str(root)), "on-1"))
    assert "## On-policy rounds" in report and two["cache"]["folder"] in report

    before = {k: v for k, v in _files(root).items() if not k.startswith("runs/")}
    again = nightly(config, run_id="on-2")
    after = {k: v for k, v in _files(root).items() if not k.startswith("runs/")}
    assert after == before  # no cache, round student, student or registry file was rewritten
    assert again["registered"]["version"] == 1


def test_a_run_killed_in_round_two_resumes_in_round_two_with_the_uninterrupted_weights(tiny_config, tmp_path, monkeypatch):
    whole_root, killed_root = tmp_path / "whole", tmp_path / "killed"
    nightly(_rounds_config(tiny_config, whole_root), run_id="whole")
    config = _rounds_config(tiny_config, killed_root)
    monkeypatch.setenv(FAIL_AT_STEP_ENV, "5")  # round 2 is steps 4-6; a checkpoint at step 4
    with pytest.raises(Exception, match="injected failure after step 5"):
        nightly(config, run_id="killed")
    monkeypatch.delenv(FAIL_AT_STEP_ENV)
    round_one = {k: v for k, v in _files(killed_root).items() if "/rounds/1/" in k or k.startswith("caches/student_samples/")}
    assert not (killed_root / "runs/killed/stages/train_round_2.json").exists()
    nightly(config, run_id="killed")
    assert _stage(killed_root, "killed", "train_round_2")["result"]["resumed_from_step"] == 4
    assert {k: v for k, v in _files(killed_root).items() if k in round_one} == round_one  # round 1 was not redone
    a, b = _final_weights(whole_root, "whole"), _final_weights(killed_root, "killed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_round_outside_the_run_or_out_of_order_is_refused(tiny_config, tmp_path):
    from flows.stages import prepare_data_flow

    config = _rounds_config(tiny_config, tmp_path / "root")
    prepare_data_flow(run_id="r", config=config)
    with pytest.raises(ConfigError, match="round 3 is not one of this run's rounds 1..2"):
        sample_round_flow(run_id="r", config=config, round=3)
    with pytest.raises(ConfigError, match=r"run sample_round first \(distillery stage sample_round CONFIG --run-id r --round 1\)"):
        sample_round_flow(run_id="r", config=config, round=2)
    with pytest.raises(ConfigError, match="--round 1"):
        train_round_flow(run_id="r", config=config, round=1)


def test_the_next_night_starts_from_the_champion_and_a_champion_of_another_teacher_or_tokenizer_is_refused(tiny_config, tmp_path):
    import dataclasses

    from distill_core.rounds import champion_start
    from distill_core.teacher.load import TeacherRef

    root = tmp_path / "root"
    first = _rounds_config(tiny_config, root)
    nightly(first, run_id="night-1")
    champion = get_version(Storage(str(root)), "tiny", 1)
    second = first.model_validate(first.model_dump() | {"student_samples": first.student_samples.model_dump() | {"policy": "champion"}})
    nightly(second, run_id="night-2")
    start = _stage(root, "night-2", "sample_round_1")["champion"]
    assert start["version"] == 1 and start["folder"] == champion["path"]
    assert _stage(root, "night-2", "sample_round_1")["cache"]["folder"] != _stage(root, "night-1", "sample_round_1")["cache"]["folder"]
    # night 2 samples with night 1's final student, the champion
    night_one_final = _stage(root, "night-1", "train_round_2")["student_fingerprint"]
    assert get_version(Storage(str(root)), "tiny", 2)["lineage"]["rounds"][0]["sampled_by"] == night_one_final

    teacher = TeacherRef.from_dict(_stage(root, "night-2", "teacher"))
    with pytest.raises(ConfigError, match="was distilled from teacher .* not this run's 0000000000000000"):
        champion_start(Storage(str(root)), "tiny", dataclasses.replace(teacher, fingerprint="0" * 16))
    with pytest.raises(ConfigError, match="has another tokenizer .* set student_samples.policy to init"):
        champion_start(Storage(str(root)), "tiny", dataclasses.replace(teacher, tokenizer_hash="f" * 16))
