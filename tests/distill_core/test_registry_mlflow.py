"""The MLflow registry backend against a real ``mlflow server`` on loopback (conftest ``mlflow_server``)."""

from __future__ import annotations

import pytest
import torch

from distill_core.errors import RegistryError
from distill_core.registry_mlflow import champion_version, find_by_lineage, register

LINEAGE = {"teacher": "tiny-gpt2@abc123", "data_fingerprint": "d41d8cd98f00b204", "cache_ids": ["topk-7f3a"]}
CONFIG = {"student": {"n_layer": 2, "n_embd": 32}, "train": {"losses": [{"name": "forward_kl", "weight": 1.0}]}}


@pytest.fixture(autouse=True)
def _no_telemetry(monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")


def _register(uri, model, tokenizer, ppl, folder, name="student"):
    return register(
        uri, name, model, tokenizer, metrics={"val_ppl": ppl, "val_loss": 1.5, "note": "tiny"},
        lineage={**LINEAGE, "student_folder": folder}, config=CONFIG, experiment="test",
    )


def _logits(model, tokenizer):
    ids = tokenizer("def main(): return 42", return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits


def test_champion_alias_moves_only_when_strictly_better(mlflow_server, tiny_teacher, tiny_tokenizer, monkeypatch, tmp_path):
    import mlflow

    uri = mlflow_server
    first = _register(uri, tiny_teacher, tiny_tokenizer, 10.0, "students/a")
    assert (first.version, first.champion, first.previous_champion, first.url) == (1, True, None, "models:/student/1")
    worse = _register(uri, tiny_teacher, tiny_tokenizer, 12.0, "students/b")
    assert (worse.version, worse.champion, worse.previous_champion) == (2, False, 1)
    assert champion_version(uri, "student") == 1
    better = _register(uri, tiny_teacher, tiny_tokenizer, 8.0, "students/c")
    assert (better.version, better.champion, better.previous_champion) == (3, True, 1)

    client = mlflow.MlflowClient(uri)
    assert sorted(int(v.version) for v in client.search_model_versions("name = 'student'")) == [1, 2, 3]
    assert client.get_model_version_by_alias("student", "champion").version == "3"
    version = client.get_model_version("student", "2")
    run = client.get_run(version.run_id)
    assert run.data.metrics == {"val_ppl": 12.0, "val_loss": 1.5}  # numbers only
    assert run.data.params["student.n_layer"] == "2" and "forward_kl" in run.data.params["train.losses"]
    assert run.data.tags["lineage.teacher"] == LINEAGE["teacher"]
    assert version.tags["lineage.student_folder"] == "students/b"
    assert "# student v2" in version.description and "| val_ppl (primary) | 12 |" in version.description

    # The version is a transformers-flavour model: it loads back with the same logits.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    parts = mlflow.transformers.load_model("models:/student@champion", return_type="components")
    torch.testing.assert_close(_logits(parts["model"].eval(), parts["tokenizer"]),
                               _logits(tiny_teacher, tiny_tokenizer), rtol=0, atol=0)
    local = mlflow.artifacts.download_artifacts("models:/student/2", dst_path=str(tmp_path))
    card = (tmp_path / local / "README.md").read_text()
    assert "# student v2" in card and 'mlflow.transformers.load_model("models:/student/2"' in card

    found = find_by_lineage(uri, "student", "student_folder", "students/b")
    assert (found.version, found.champion) == (2, False)
    assert find_by_lineage(uri, "student", "student_folder", "students/z") is None
    assert find_by_lineage(uri, "nobody", "student_folder", "students/b") is None


def test_register_task_dispatches_to_mlflow(mlflow_server, tmp_path, tiny_teacher, tiny_tokenizer):
    from distill_core.config import parse_config
    from distill_core.storage import Storage
    from tasks.registry import register_student

    config = parse_config({
        "storage": {"root": str(tmp_path / "root")},
        "registry": {"kind": "mlflow", "name": "via-task", "tracking_uri": mlflow_server, "experiment": "test"},
    })
    folder = "students/x/student/model"
    local = Storage(config.storage.root).local_path(folder)
    tiny_teacher.save_pretrained(local)
    tiny_tokenizer.save_pretrained(local)
    args = (config, "run-1", {"source": "path:tiny", "fingerprint": "t"}, {"fingerprint": "d"}, {},
            {"model_folder": folder}, {"student": {"val_ppl": 9.0}, "teacher": {"val_ppl": 5.0}})
    first = register_student.fn(*args)
    assert (first["version"], first["champion"], first["url"]) == (1, True, "models:/via-task/1")
    assert register_student.fn(*args)["version"] == 1  # the same student is not registered twice
    assert not (tmp_path / "root" / "registry").exists()


def test_errors_before_contacting_a_server(monkeypatch, tiny_teacher, tiny_tokenizer):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(RegistryError, match="no tracking server is named"):
        register(None, "student", tiny_teacher, tiny_tokenizer, metrics={"val_ppl": 1.0}, lineage={}, config={})
    with pytest.raises(RegistryError, match=r"metrics\['val_ppl'\] must be a finite number"):
        register("http://127.0.0.1:9", "student", tiny_teacher, tiny_tokenizer, metrics={}, lineage={}, config={})
