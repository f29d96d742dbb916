"""Flow run names say what runs: stage, teacher, student, data and date."""

import datetime as dt
import re
from types import SimpleNamespace

import pytest

import flows.naming as naming
from distill_core.config import parse_config


@pytest.mark.parametrize("teacher, data, expected", [
    ({"kind": "hub", "name": "openai-community/gpt2-xl"}, "wikitext", "gpt2-xl-to-tiny-on-wikitext"),
    ({"kind": "path", "path": "s3://models/gpt2-xl/"}, "/data/python-docs/", "gpt2-xl-to-tiny-on-python-docs"),
    ({"kind": "gguf", "file": "/models/SmolLM2-135M.Q4_1.gguf"}, "embedded", "SmolLM2-135M.Q4_1-to-tiny-on-embedded"),
    ({"kind": "gguf", "file": "embedded"}, "embedded", "embedded-to-tiny-on-embedded"),
])
def test_describe_names_teacher_student_and_data(teacher, data, expected):
    config = parse_config({"teacher": teacher, "data": {"source": data}, "registry": {"name": "tiny"}})
    assert naming.describe(config) == expected


def test_run_name_adds_the_stage_and_the_date(monkeypatch):
    config = parse_config({"teacher": {"kind": "hub", "name": "gpt2-xl"}, "registry": {"name": "tiny"}})
    # the UI passes parameters as JSON: the name is built from the raw dict too
    for params in ({"config": config}, {"config": config.model_dump(mode="json")}):
        monkeypatch.setattr(naming, "flow_run", SimpleNamespace(parameters=params))
        name = naming.run_name("train-student")()
        assert re.fullmatch(r"train-student-gpt2-xl-to-tiny-on-embedded-\d{4}-\d{2}-\d{2}", name)
        assert name.endswith(f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d}")
