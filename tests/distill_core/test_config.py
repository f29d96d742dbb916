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
