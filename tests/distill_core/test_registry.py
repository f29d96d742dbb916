from __future__ import annotations

import json
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill_core import registry
from distill_core.errors import RegistryError
from distill_core.registry import get_version, list_models, list_versions, register, resolve_path, set_alias
from distill_core.storage import Storage, sha256_bytes

LINEAGE = {
    "teacher": "tiny-gpt2@abc123",
    "data_fingerprint": "d41d8cd98f00b204",
    "cache_ids": ["topk-7f3a", "samples-19be"],
    "flow_run_id": "run-42",
    "code_version": "0.1.0+gdeadbee",
}
CONFIG = {"student": {"n_layer": 2, "n_embd": 32}, "loss": [{"name": "sparse_kl", "weight": 1.0}]}


@pytest.fixture
def storage(tmp_path):
    return Storage(str(tmp_path / "root"))


def _register(storage, model, tokenizer, ppl, name="student", **kwargs):
    return register(
        storage, name, model, tokenizer,
        metrics={"val_ppl": ppl, "val_loss": 1.5, "note": "tiny"}, lineage=LINEAGE, config=CONFIG, **kwargs,
    )


def _logits(model, tokenizer):
    ids = tokenizer("def main(): return 42", return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits


def test_champion_moves_only_when_strictly_better(storage, tiny_teacher, tiny_tokenizer):
    first = _register(storage, tiny_teacher, tiny_tokenizer, 10.0)
    assert (first.version, first.champion, first.previous_champion) == (1, True, None)

    worse = _register(storage, tiny_teacher, tiny_tokenizer, 12.0)
    assert (worse.version, worse.champion, worse.previous_champion) == (2, False, 1)
    tie = _register(storage, tiny_teacher, tiny_tokenizer, 10.0)
    assert (tie.version, tie.champion) == (3, False)
    assert get_version(storage, "student", "champion")["version"] == 1

    better = _register(storage, tiny_teacher, tiny_tokenizer, 8.0)
    assert (better.version, better.champion, better.previous_champion) == (4, True, 1)
    assert get_version(storage, "student", "champion")["version"] == 4
    assert better.url == storage.url("registry/student/4")

    versions = list_versions(storage, "student")
    assert [v["version"] for v in versions] == [1, 2, 3, 4]
    assert versions[1]["metrics"] == {"val_ppl": 12.0, "val_loss": 1.5}  # numbers only
    assert versions[1]["path"] == "registry/student/2"
    assert list_models(storage) == ["student"]


def test_higher_is_better_metric(storage, tiny_teacher, tiny_tokenizer):
    kwargs = {"lineage": LINEAGE, "config": CONFIG, "primary_metric": "acc", "lower_is_better": False}
    register(storage, "m", tiny_teacher, tiny_tokenizer, metrics={"acc": 0.5}, **kwargs)
    assert not register(storage, "m", tiny_teacher, tiny_tokenizer, metrics={"acc": 0.4}, **kwargs).champion
    assert register(storage, "m", tiny_teacher, tiny_tokenizer, metrics={"acc": 0.6}, **kwargs).champion


def test_version_folder_loads_with_same_logits(storage, tiny_teacher, tiny_tokenizer):
    _register(storage, tiny_teacher, tiny_tokenizer, 10.0)
    path = resolve_path(storage, "student", "champion")
    assert path == str(storage.local_path("registry/student/1"))

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer("def main(): return 42").input_ids == tiny_tokenizer("def main(): return 42").input_ids
    torch.testing.assert_close(_logits(model, tokenizer), _logits(tiny_teacher, tiny_tokenizer), rtol=0, atol=0)

    entry = get_version(storage, "student", 1)
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md"):
        assert name in entry["files"]
    for name, meta in entry["files"].items():  # the entry's hashes describe the stored files
        assert sha256_bytes(storage.read_bytes(f"registry/student/1/{name}")) == meta["sha256"]
    assert entry["config"] == CONFIG and entry["lineage"] == LINEAGE
    assert entry["primary_metric"] == "val_ppl" and entry["lower_is_better"] is True


def test_a_model_loaded_from_the_root_shares_its_unchanged_files_by_hard_link(storage, tiny_teacher, tiny_tokenizer, tmp_path):
    import os

    from distill_core.evaluate import load_model

    saved = tmp_path / "saved"
    tiny_teacher.save_pretrained(saved)
    tiny_tokenizer.save_pretrained(saved)
    storage.upload_dir(saved, "students/s/model")
    storage.write_bytes("students/s/model/tokenizer.json", b"{}")  # differs from what the registry writes
    _register(storage, load_model(storage, "students/s/model"), tiny_tokenizer, 10.0, link_from="students/s/model")
    source, version = storage.local_path("students/s/model"), storage.local_path("registry/student/1")
    assert os.stat(version / "model.safetensors").st_ino == os.stat(source / "model.safetensors").st_ino
    assert os.stat(version / "tokenizer.json").st_ino != os.stat(source / "tokenizer.json").st_ino
    for name, meta in get_version(storage, "student", 1)["files"].items():
        assert sha256_bytes(storage.read_bytes(f"registry/student/1/{name}")) == meta["sha256"]
    _register(storage, tiny_teacher, tiny_tokenizer, 9.0)  # no source folder: copied
    assert os.stat(storage.local_path("registry/student/2") / "model.safetensors").st_nlink == 1


def test_model_card_has_metrics_lineage_config(storage, tiny_teacher, tiny_tokenizer):
    _register(storage, tiny_teacher, tiny_tokenizer, 9.8765)
    card = storage.read_bytes("registry/student/1/README.md").decode()
    assert "# student v1" in card
    assert "| val_ppl (primary) | 9.8765 |" in card and "| val_loss | 1.5 |" in card
    for value in LINEAGE.values():
        for item in value if isinstance(value, list) else [value]:
            assert item in card
    assert "sparse_kl" in card and "n_layer: 2" in card  # the config, as YAML
    assert "AutoModelForCausalLM.from_pretrained(path)" in card


def test_entry_written_after_all_files(storage, tiny_teacher, tiny_tokenizer, monkeypatch):
    written = []
    original_bytes, original_file = storage.write_bytes, storage.upload_file

    def recording(rel, data):
        written.append(rel)
        original_bytes(rel, data)

    def uploading(local_file, rel):
        written.append(rel)
        original_file(local_file, rel)

    monkeypatch.setattr(storage, "write_bytes", recording)
    monkeypatch.setattr(storage, "upload_file", uploading)
    _register(storage, tiny_teacher, tiny_tokenizer, 10.0)

    in_version = [rel.removeprefix("registry/student/1/") for rel in written if rel.startswith("registry/student/1/")]
    assert in_version[-1] == "entry.json"
    assert sorted(in_version[:-1]) == sorted(get_version(storage, "student", 1)["files"])
    # index and aliases follow the commit
    assert written.index("registry/student/1/entry.json") < written.index("registry/student/index.json")
    assert written[-1] == "registry/student/aliases.json"


def _snapshot(storage, folder):
    return {p: storage.read_bytes(f"{folder}/{p}") for p in storage.listdir(folder)}


def test_existing_version_is_immutable(storage, tiny_teacher, tiny_tokenizer, monkeypatch):
    _register(storage, tiny_teacher, tiny_tokenizer, 10.0)
    # Another writer committed version 2 after this register picked its number.
    other = {**get_version(storage, "student", 1), "version": 2, "path": "registry/student/2"}
    storage.write_json("registry/student/2/entry.json", other)
    storage.write_bytes("registry/student/2/model.safetensors", b"the other writer's weights")
    before = _snapshot(storage, "registry/student/2")
    monkeypatch.setattr(registry, "_next_version", lambda storage, name: 2)

    with pytest.raises(RegistryError, match=r"version 2 of 'student' already exists .* immutable"):
        _register(storage, tiny_teacher, tiny_tokenizer, 5.0)
    assert _snapshot(storage, "registry/student/2") == before
    assert get_version(storage, "student", "champion")["version"] == 1
    assert not storage.exists("registry/student/.lock")

    # Without the simulated race, the next register skips the committed 2 and the index heals.
    monkeypatch.undo()
    assert _register(storage, tiny_teacher, tiny_tokenizer, 5.0).version == 3
    assert [v["version"] for v in list_versions(storage, "student")] == [1, 2, 3]


def test_entry_committed_during_upload_is_not_overwritten(storage, tiny_teacher, tiny_tokenizer, monkeypatch):
    upload = storage.upload_dir

    def racing_upload(local_dir, rel, **kwargs):
        storage.write_bytes(f"{rel}/entry.json", b'{"writer": "other"}')
        upload(local_dir, rel, **kwargs)

    monkeypatch.setattr(storage, "upload_dir", racing_upload)
    with pytest.raises(RegistryError, match="version 1 of 'student' already exists"):
        _register(storage, tiny_teacher, tiny_tokenizer, 10.0)
    assert storage.read_bytes("registry/student/1/entry.json") == b'{"writer": "other"}'
    assert not storage.exists("registry/student/aliases.json")


def test_missing_model_version_alias_errors(storage, tiny_teacher, tiny_tokenizer):
    with pytest.raises(RegistryError, match=r"no model 'student' .*models: \(none registered yet\)"):
        list_versions(storage, "student")
    _register(storage, tiny_teacher, tiny_tokenizer, 10.0)

    with pytest.raises(RegistryError, match=r"no model 'teacher' .*models: student"):
        get_version(storage, "teacher", 1)
    with pytest.raises(RegistryError, match=r"'student' has no version 7; versions: 1"):
        resolve_path(storage, "student", 7)
    with pytest.raises(RegistryError, match=r"'student' has no alias 'best'; aliases: champion -> v1"):
        get_version(storage, "student", "best")

    assert set_alias(storage, "student", "best", 1) is None
    assert get_version(storage, "student", "best")["version"] == 1
    assert get_version(storage, "student", "1")["version"] == 1
    with pytest.raises(RegistryError, match="has no version 3"):
        set_alias(storage, "student", "champion", 3)
    with pytest.raises(RegistryError, match="not allowed"):
        register(storage, "../escape", tiny_teacher, tiny_tokenizer, metrics={"val_ppl": 1.0}, lineage={}, config={})


def test_set_alias_promotes_manually(storage, tiny_teacher, tiny_tokenizer):
    _register(storage, tiny_teacher, tiny_tokenizer, 10.0)
    _register(storage, tiny_teacher, tiny_tokenizer, 12.0)
    assert set_alias(storage, "student", "champion", 2) == 1
    assert get_version(storage, "student", "champion")["version"] == 2
    # automatic moves compare against the promoted champion (12.0)
    assert _register(storage, tiny_teacher, tiny_tokenizer, 11.0).champion


def test_half_written_version_is_not_listed_and_is_reused(storage, tiny_teacher, tiny_tokenizer):
    _register(storage, tiny_teacher, tiny_tokenizer, 10.0)
    storage.write_bytes("registry/student/2/model.safetensors", b"truncated")
    storage.write_bytes("registry/student/2/stray.bin", b"left by a killed upload")

    assert [v["version"] for v in list_versions(storage, "student")] == [1]
    with pytest.raises(RegistryError, match="no version 2"):
        get_version(storage, "student", 2)

    again = _register(storage, tiny_teacher, tiny_tokenizer, 9.0)
    assert again.version == 2 and again.champion
    assert not storage.exists("registry/student/2/stray.bin")
    assert set(storage.listdir("registry/student/2")) == {*get_version(storage, "student", 2)["files"], "entry.json"}


def test_concurrent_registers_get_distinct_versions(storage, tiny_teacher, tiny_tokenizer):
    barrier = threading.Barrier(3)
    results, errors = [], []

    def worker(ppl):
        barrier.wait()
        try:
            results.append(_register(storage, tiny_teacher, tiny_tokenizer, ppl))
        except Exception as exc:  # surfaced by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(p,)) for p in (10.0, 11.0, 12.0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(r.version for r in results) == [1, 2, 3]
    assert [v["version"] for v in list_versions(storage, "student")] == [1, 2, 3]
    assert get_version(storage, "student", "champion")["metrics"]["val_ppl"] == 10.0
    assert not storage.exists("registry/student/.lock")


def test_stale_lock_times_out_with_fix(storage, tiny_teacher, tiny_tokenizer):
    storage.write_json("registry/student/.lock", {"host": "elsewhere", "pid": 1})
    with pytest.raises(RegistryError, match=r"lock .*\.lock is still held .*elsewhere.*delete that file"):
        _register(storage, tiny_teacher, tiny_tokenizer, 10.0, lock_timeout=0.2)
    assert storage.listdir("registry/student") == [".lock"]


@pytest.mark.parametrize("metrics", [{"val_loss": 1.0}, {"val_ppl": float("nan")}, {"val_ppl": "low"}])
def test_primary_metric_must_be_a_finite_number(storage, tiny_teacher, tiny_tokenizer, metrics):
    with pytest.raises(RegistryError, match=r"metrics\['val_ppl'\] must be a finite number"):
        register(storage, "student", tiny_teacher, tiny_tokenizer, metrics=metrics, lineage={}, config={})
    assert not storage.exists("registry")


def test_register_list_champion_on_s3(s3_storage, tiny_teacher, tiny_tokenizer, tmp_path):
    storage = s3_storage
    assert _register(storage, tiny_teacher, tiny_tokenizer, 10.0).champion
    assert not _register(storage, tiny_teacher, tiny_tokenizer, 12.0).champion
    third = _register(storage, tiny_teacher, tiny_tokenizer, 8.0)
    assert (third.version, third.champion, third.previous_champion) == (3, True, 1)
    assert third.url == f"{storage.root}/registry/student/3"

    assert [v["version"] for v in list_versions(storage, "student")] == [1, 2, 3]
    assert list_models(storage) == ["student"]
    assert resolve_path(storage, "student", "champion") == third.url
    assert json.loads(storage.read_bytes("registry/student/aliases.json")) == {"champion": 3}
    assert not storage.exists("registry/student/.lock")

    local = storage.download_dir("registry/student/3", tmp_path / "v3")
    model = AutoModelForCausalLM.from_pretrained(local).eval()
    torch.testing.assert_close(_logits(model, tiny_tokenizer), _logits(tiny_teacher, tiny_tokenizer), rtol=0, atol=0)
