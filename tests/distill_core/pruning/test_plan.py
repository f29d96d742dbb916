"""Resolving student.init 'pruned': bad shapes refused before any teacher work, plans stored and reused."""

from __future__ import annotations

import pytest
import torch

from distill_core.config import StudentConfig, TrainConfig
from distill_core.errors import ConfigError, TeacherError
from distill_core.pruning.plan import check_request, plan_folder, plan_of, plan_student
from distill_core.storage import Storage


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"num_layers": 9}, r"num_layers=9 is larger than the teacher's 4"),
        ({"layers": [0, 4]}, r"name layers the teacher lacks"),
        ({"num_layers": 2, "intermediate_size": 41}, r"intermediate_size=41 is larger than the teacher's 40"),
        ({"num_layers": 2, "num_attention_heads": 3}, r"splits a KV group.*multiple of 2"),
        ({"num_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1}, r"do not keep whole KV groups"),
        ({"target_params": 10**9}, r"not below the teacher's"),
        ({"target_params": 100}, r"below the smallest pruned student"),
    ],
)
def test_llama_shapes_the_teacher_cannot_give_are_refused(llama, fields, message):
    with pytest.raises(ConfigError, match=message):
        check_request(llama.config, StudentConfig(init="pruned", **fields))


def test_gpt2_refuses_head_and_hidden_pruning_naming_the_fields(gpt2):
    with pytest.raises(ConfigError, match=r"\['num_attention_heads', 'hidden_size'\] cannot be pruned in GPT-2"):
        check_request(gpt2.config, StudentConfig(init="pruned", num_layers=2, num_attention_heads=2, hidden_size=16))
    check_request(gpt2.config, StudentConfig(init="pruned", num_layers=2, intermediate_size=16))  # depth and MLP: fine


def test_an_architecture_the_slicer_does_not_know_is_refused():
    from transformers import GPTNeoXConfig

    with pytest.raises(TeacherError, match=r"cannot slice a 'gpt_neox' teacher.*teacher_layers"):
        check_request(GPTNeoXConfig(), StudentConfig(init="pruned"))


def test_config_refuses_a_budget_together_with_a_shape_and_widths_on_other_inits():
    with pytest.raises(ValueError, match="either target_params or an explicit shape"):
        StudentConfig(init="pruned", target_params=10**6, num_layers=3)
    with pytest.raises(ValueError, match=r"apply to init 'pruned' only"):
        StudentConfig(init="teacher_layers", intermediate_size=64)


def test_plan_is_stored_once_and_reused(llama, tmp_path):
    storage = Storage(str(tmp_path))
    cfg = StudentConfig(init="pruned", num_layers=3, intermediate_size=24, num_key_value_heads=2, calibration_sequences=3)
    train = TrainConfig()
    folder = plan_folder(cfg, train, "teacher-fp", "data-fp")
    calls = []

    def sequences(n):
        calls.append(n)
        return torch.randint(0, 64, (n, 12), generator=torch.Generator().manual_seed(0))

    record = plan_student(llama, cfg, train, storage, "teacher-fp", "data-fp", sequences)
    assert record["folder"] == folder and (tmp_path / folder / "plan.json").is_file()
    assert record["shape"] == {"layers": record["shape"]["layers"], "intermediate_size": 24, "num_key_value_heads": 2,
                               "num_attention_heads": 4, "hidden_size": 48}
    assert record["shape"]["layers"][0] == 0 and record["shape"]["layers"][-1] == 3 and len(record["shape"]["layers"]) == 3
    assert len(record["importance"]["block_influence"]) == 4 and record["search"] is None
    assert plan_student(llama, cfg, train, storage, "teacher-fp", "data-fp", sequences) == record and calls == [3]
    other = plan_student(llama, cfg.model_copy(update={"num_layers": 2}), train, storage, "teacher-fp", "data-fp", sequences)
    assert other["importance"] == record["importance"] and len(list((tmp_path / "pruning/importance").iterdir())) == 1
    assert len(plan_of(record).neurons[0]) == 24
    assert plan_folder(cfg, train.model_copy(update={"lr": 1.0}), "teacher-fp", "data-fp") == folder  # no search: lr unused
    assert plan_folder(cfg.model_copy(update={"num_layers": 2}), train, "teacher-fp", "data-fp") != folder


def test_too_few_calibration_sequences_is_a_clear_error(llama, tmp_path):
    cfg = StudentConfig(init="pruned", num_layers=2, calibration_sequences=8)
    with pytest.raises(ConfigError, match=r"calibration_sequences=8 .* exceeds the 5 train sequences"):
        plan_student(llama, cfg, TrainConfig(), Storage(str(tmp_path)), "t", "d", lambda n: torch.zeros(5, 12, dtype=torch.int64))


def test_preflight_refuses_a_pruned_shape_from_the_teacher_config_alone(tiny_teacher_dir, tiny_teacher):
    from types import SimpleNamespace

    from distill_core.config import parse_config
    from distill_core.preflight import check_run

    teacher = SimpleNamespace(path=str(tiny_teacher_dir), num_layers=4, vocab_size=tiny_teacher.config.vocab_size)
    run = lambda student: parse_config({"student": student})  # noqa: E731
    with pytest.raises(ConfigError, match=r"intermediate_size=999 is larger than the teacher's 128"):
        check_run(run({"init": "pruned", "num_layers": 2, "intermediate_size": 999}), teacher)
    with pytest.raises(ConfigError, match=r"cannot be pruned in GPT-2"):
        check_run(run({"init": "pruned", "num_layers": 2, "hidden_size": 16}), teacher)
    check_run(run({"init": "pruned", "num_layers": 2, "intermediate_size": 64}), teacher)
