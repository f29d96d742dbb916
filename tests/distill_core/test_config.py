from pathlib import Path

import pytest

from distill_core.config import GGUFTeacher, RunConfig, load_config, parse_config
from distill_core.errors import ConfigError

DEPLOYMENTS = Path(__file__).resolve().parents[2] / "deployments"


@pytest.mark.parametrize("path", sorted(p for p in DEPLOYMENTS.glob("*.yaml") if p.name != "prefect.yaml"), ids=lambda p: p.name)
def test_every_deployment_config_validates(path):
    assert isinstance(load_config(path), RunConfig)


def test_defaults_are_the_embedded_demo():
    cfg = RunConfig()
    assert isinstance(cfg.teacher, GGUFTeacher) and cfg.data.source == "embedded"
    assert [t.name for t in cfg.train.losses] == ["forward_kl", "ce"]


@pytest.mark.parametrize("raw, field", [
    ({"topk": {"k": 0}}, "topk.k"),
    ({"train": {"lr": -1}}, "train.lr"),
    ({"train": {"losses": [{"name": "cosine"}]}}, "train.losses.0.name"),
    ({"teacher": {"kind": "ftp", "path": "x"}}, "teacher"),
    ({"student": {"init": "pretrained"}}, "student"),
    ({"data": {"seq_len": 4}}, "data.seq_len"),
    ({"registry": {"name": "bad name!"}}, "registry.name"),
    ({"trian": {}}, "trian"),
])
def test_invalid_values_name_the_field(raw, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        parse_config(raw)


def test_missing_config_file_says_so(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_json_schema_has_descriptions_and_choices():
    schema = RunConfig.model_json_schema()
    assert "forward_kl" in str(schema) and "description" in str(schema["$defs"]["TopKConfig"])


@pytest.mark.parametrize("text, key, lines", [
    ("train:\n  lr: 0.001\ndata:\n  seq_len: 64\ntrain:\n  steps: 5\n", "train", (1, 5)),
    ("train:\n  lr: 0.001\n  steps: 5\n  lr: 0.01\n", "lr", (2, 4)),
])
def test_a_key_given_twice_is_refused_with_both_lines(tmp_path, text, key, lines):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"key '{key}' is given twice \(line {lines[0]} and line {lines[1]}\).*delete one"):
        load_config(path)


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  <<: {lr: 0.001, steps: 3}\n  lr: 0.01\n")
    assert load_config(path).train.lr == 0.01


def test_yaml_syntax_error_is_one_line_with_file_line_and_column(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 0.001\n  steps: [1, 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}:4:1: YAML syntax error:"), message


def _losses(*names, **extra):
    return {"losses": [{"name": n, **extra} for n in names]}


@pytest.mark.parametrize("raw, message", [
    ({"topk": {"strategy": "sampled"}, "train": _losses("reverse_kl", "ce")}, r"\['reverse_kl'\] cannot be estimated from teacher draws"),
    ({"topk": {"strategy": "sampled"}, "train": _losses("jsd", "tvd")}, r"\['jsd', 'tvd'\]"),
    ({"topk": {"strategy": "hybrid"}, "train": {**_losses("forward_kl"), "tail": "renormalize"}}, "set train.tail to 'bucket'"),
    ({"topk": {"temperatures": [2.0]}, "train": {"temperature": 4.0}}, r"serves \[1.0, 2.0\]: set train.temperature to one of them"),
    ({"topk": {"temperatures": [0.0]}}, "must each be in"),
])
def test_targets_the_strategy_cannot_give_are_refused_when_parsed(raw, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(raw)


@pytest.mark.parametrize("raw", [
    {"topk": {"strategy": "sampled"}, "train": _losses("forward_kl", "skew_kl", "ce")},
    {"topk": {"strategy": "hybrid"}, "train": _losses("forward_kl", "reverse_kl", "jsd", "tvd")},
    {"topk": {"strategy": "sampled"}, "samples": {"soft_topk": 8}, "train": _losses("reverse_kl", on="samples")},
    {"topk": {"temperature": 2.0, "temperatures": [1.0, 4.0]}, "train": {"temperature": 4.0}},
])
def test_targets_the_strategy_gives_are_accepted(raw):
    assert isinstance(parse_config(raw), RunConfig)


# -- on-policy rounds ------------------------------------------------------------------------------
_ON_POLICY = [{"name": "reverse_kl", "on": "student_samples"}, {"name": "ce"}]


def test_on_policy_rounds_default_to_equal_rounds_and_stay_off_the_teacher_caches():
    cfg = parse_config({"train": {"losses": _ON_POLICY, "steps": 12, "rounds": 3}})
    assert cfg.train.on_policy and cfg.train.steps_per_round == 4
    assert cfg.train.losses[0].source == "student_samples"
    assert cfg.train.caches() == []  # ce alone: no teacher cache at the start; each round grades its own
    assert cfg.student_samples.policy == "init"
    plain = parse_config({})
    assert not plain.train.on_policy and plain.train.rounds == 1


@pytest.mark.parametrize("train, message", [
    ({"rounds": 2, "steps": 4}, "no loss part has on: student_samples"),
    ({"round_steps": 2, "steps": 4}, "round_steps is set but no loss part"),
    ({"losses": _ON_POLICY, "rounds": 2, "round_steps": 3, "steps": 4}, r"= 6, but train.steps is 4"),
    ({"losses": _ON_POLICY, "rounds": 3, "steps": 4}, "does not divide into train.rounds 3"),
    ({"losses": _ON_POLICY, "on_policy_fraction": 0.0}, "on_policy_fraction is 0"),
    ({"losses": _ON_POLICY, "on_policy_fraction": 1.0}, r"parts \['ce'\] never train"),
    ({"losses": _ON_POLICY[:1], "on_policy_fraction": 0.5}, "every loss part is on student_samples"),
    ({"losses": _ON_POLICY, "on_policy_fraction": 1.5}, "train.on_policy_fraction"),
    ({"losses": [{"name": "seqkd", "on": "student_samples"}]}, "on=student_samples applies to soft-target terms"),
])
def test_bad_round_settings_are_refused_with_the_fix(train, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({"train": train})


def test_student_samples_prompt_must_fit_and_champion_needs_the_file_registry():
    with pytest.raises(ConfigError, match="student_samples.prompt_len 32 must be below data.seq_len 16"):
        parse_config({"data": {"seq_len": 16}, "train": {"losses": _ON_POLICY}})
    with pytest.raises(ConfigError, match="policy 'champion' reads the champion from the file registry"):
        parse_config({"student_samples": {"policy": "champion"}, "registry": {"kind": "mlflow"}})
    with pytest.raises(ConfigError, match="student_samples.policy"):
        parse_config({"student_samples": {"policy": "latest"}})


def test_metrics_that_compare_token_ids_cannot_be_forced_on_for_a_student_with_its_own_tokenizer():
    with pytest.raises(ConfigError, match="eval.generation 'on' compare token ids with the teacher's"):
        parse_config({"student": {"tokenizer": "some/tokenizer"}, "eval": {"generation": "on"}})
    with pytest.raises(ConfigError, match="set train.tail to 'bucket' with student.tokenizer"):
        parse_config({"student": {"tokenizer": "some/tokenizer"}, "train": {"tail": "renormalize"}})
    cfg = parse_config({"student": {"tokenizer": "some/tokenizer"}, "train": {"losses": [{"name": "seqkd"}]}})
    assert not cfg.eval.wants("generation", cfg.train, own_tokenizer=True) and cfg.eval.wants("generation", cfg.train)
