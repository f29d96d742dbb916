"""Teacher resolution and loading: path (local and remote), GGUF, hub; the real GGUF teacher is slow."""

from __future__ import annotations

import json
import re
import shutil
import time
import uuid

import pytest
import torch

from distill_core.config import GGUFTeacher, HubTeacher, PathTeacher
from distill_core.errors import TeacherError
from distill_core.storage import Storage
from distill_core.teacher import load as teacher_load
from distill_core.teacher.load import (
    TeacherRef,
    check_tokenizer,
    embedded_gguf_path,
    load_teacher,
    load_tokenizer,
    resolve_teacher,
    tokenizer_hash,
)


@pytest.fixture
def storage(tmp_path):
    return Storage(str(tmp_path / "runs"))


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "cache"))


def _logits(model, tokenizer, text="def f(x):\n    return x"):
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits


# -- path ------------------------------------------------------------------------------------------
def test_path_teacher_resolves_with_stable_fingerprint(tiny_teacher_dir, tiny_tokenizer, storage):
    ref = resolve_teacher(PathTeacher(path=str(tiny_teacher_dir)), storage)
    again = resolve_teacher(PathTeacher(path=str(tiny_teacher_dir)), storage)

    assert ref == again
    assert len(ref.fingerprint) == 16 and int(ref.fingerprint, 16) >= 0
    assert ref.tokenizer_hash == tokenizer_hash(tiny_tokenizer)
    assert ref.source == f"path:{tiny_teacher_dir}" and ref.path == str(tiny_teacher_dir)
    assert (ref.vocab_size, ref.model_type, ref.num_layers, ref.eos_token_id) == (len(tiny_tokenizer), "gpt2", 4, 0)
    assert TeacherRef.from_dict(json.loads(json.dumps(ref.to_dict()))) == ref
    assert not storage.exists("teachers")  # a path teacher is used where it is


def test_teacher_precision_resolves_from_the_config(tiny_teacher_dir, storage):
    auto = resolve_teacher(PathTeacher(path=str(tiny_teacher_dir)), storage)
    assert auto.dtype == ("bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32")
    half = resolve_teacher(PathTeacher(path=str(tiny_teacher_dir), dtype="bfloat16"), storage)
    assert half.dtype == "bfloat16" and half.fingerprint == auto.fingerprint  # same weights
    assert load_teacher(half, storage, dtype=getattr(torch, half.dtype))[0].dtype == torch.bfloat16
    before = {k: v for k, v in auto.to_dict().items() if k != "dtype"}
    assert TeacherRef.from_dict(before).dtype == "float32"  # refs from before the setting ran in float32


def test_path_fingerprint_follows_the_weights(tmp_path, tiny_teacher_dir, storage):
    from transformers import AutoModelForCausalLM

    copy = shutil.copytree(tiny_teacher_dir, tmp_path / "copy")
    same = resolve_teacher(PathTeacher(path=str(copy)), storage)
    model = AutoModelForCausalLM.from_pretrained(copy)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] += 1.0
    model.save_pretrained(copy)
    changed = resolve_teacher(PathTeacher(path=str(copy)), storage)

    assert same.fingerprint == resolve_teacher(PathTeacher(path=str(tiny_teacher_dir)), storage).fingerprint
    assert changed.fingerprint != same.fingerprint
    assert changed.tokenizer_hash == same.tokenizer_hash


def test_load_teacher_from_local_path(tiny_teacher_dir, tiny_teacher, tiny_tokenizer, storage):
    ref = resolve_teacher(PathTeacher(path=str(tiny_teacher_dir)), storage)
    model, tokenizer = load_teacher(ref, storage)

    assert not model.training
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    torch.testing.assert_close(_logits(model, tokenizer), _logits(tiny_teacher, tiny_tokenizer))
    tokenizer(["a", "a longer line"], padding=True)  # leaves padding state on the backend
    assert tokenizer_hash(tokenizer) == ref.tokenizer_hash == tokenizer_hash(load_tokenizer(ref, storage))


def test_remote_path_teacher_is_downloaded_once(tmp_path, tiny_teacher_dir, tiny_teacher, tiny_tokenizer):
    remote = Storage(f"memory://distillery-test-{uuid.uuid4().hex[:8]}")
    remote.upload_dir(tiny_teacher_dir, "teacher")
    local_ref = resolve_teacher(PathTeacher(path=str(tiny_teacher_dir)), Storage(str(tmp_path / "runs")))

    ref = resolve_teacher(PathTeacher(path=remote.url("teacher")), remote)
    assert ref.fingerprint == local_ref.fingerprint  # same bytes, same fingerprint (memory:// has no ETag)
    assert ref.tokenizer_hash == local_ref.tokenizer_hash
    model, tokenizer = load_teacher(ref, remote)
    torch.testing.assert_close(_logits(model, tokenizer), _logits(tiny_teacher, tiny_tokenizer))
    cached = tmp_path / "cache" / "teachers" / ref.fingerprint
    assert (cached / "model.safetensors").is_file() and (cached / ".complete-all").is_file()


def test_missing_path_raises_naming_it(tmp_path, storage):
    missing = tmp_path / "no-such-teacher"
    with pytest.raises(TeacherError, match=f"{re.escape(str(missing))} does not exist.*save_pretrained"):
        resolve_teacher(PathTeacher(path=str(missing)), storage)


def test_path_without_config_raises_naming_it(tmp_path, tiny_teacher_dir, storage):
    broken = shutil.copytree(tiny_teacher_dir, tmp_path / "broken")
    (broken / "config.json").unlink()
    with pytest.raises(TeacherError, match=f"{re.escape(str(broken))} has no config.json.*save_pretrained"):
        resolve_teacher(PathTeacher(path=str(broken)), storage)


def test_teacher_saved_without_its_tokenizer_is_refused_naming_the_files(tmp_path, tiny_teacher, storage):
    """transformers builds a 1-token tokenizer for such a folder, which encodes every text to nothing."""
    bare = tmp_path / "no-tokenizer"
    tiny_teacher.save_pretrained(bare)
    message = (
        rf"teacher {re.escape(str(bare))}: the tokenizer has 1 token for a model of 384 and encodes .* to nothing; "
        r"the folder needs tokenizer.json or vocab.json \+ merges.txt or tokenizer.model, with tokenizer_config.json; "
        r"found none of them.*save it beside the model"
    )
    with pytest.raises(TeacherError, match=message):
        resolve_teacher(PathTeacher(path=str(bare)), storage)


def test_load_refuses_a_teacher_whose_tokenizer_went_missing(tmp_path, tiny_teacher_dir, storage):
    copy = shutil.copytree(tiny_teacher_dir, tmp_path / "copy")
    ref = resolve_teacher(PathTeacher(path=str(copy)), storage)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (copy / name).unlink()
    with pytest.raises(TeacherError, match="1 token for a model of 384.*found none of them"):
        load_tokenizer(ref, storage)
    with pytest.raises(TeacherError, match="1 token for a model of 384"):
        load_teacher(ref, storage)


def test_tokenizer_must_cover_the_models_vocabulary(tiny_tokenizer):
    check_tokenizer(tiny_tokenizer, 384, "unused", "teacher t")  # its own model
    check_tokenizer(tiny_tokenizer, 400, "unused", "teacher t")  # a padded embedding matrix
    with pytest.raises(TeacherError, match=r"teacher t: the tokenizer has 384 tokens \(ids up to 383\) but the model only 300"):
        check_tokenizer(tiny_tokenizer, 300, "unused", "teacher t")
    with pytest.raises(TeacherError, match="teacher t: the tokenizer has 384 tokens for a model of 1000 and encodes"):
        check_tokenizer(tiny_tokenizer, 1000, "unused", "teacher t")


# -- GGUF ------------------------------------------------------------------------------------------
def test_missing_gguf_file_raises_naming_it(tmp_path, storage):
    missing = tmp_path / "model.Q4_0.gguf"
    with pytest.raises(TeacherError, match=f"{re.escape(str(missing))} does not exist.*embedded"):
        resolve_teacher(GGUFTeacher(file=str(missing)), storage)


def test_file_that_is_not_gguf_raises(tmp_path, storage):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(TeacherError, match="not a GGUF file"):
        resolve_teacher(GGUFTeacher(file=str(fake)), storage)


def test_embedded_gguf_is_found_without_importing_the_package():
    path = embedded_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    with path.open("rb") as f:
        assert f.read(4) == b"GGUF"


def test_gguf_conversion_is_committed_by_its_marker(tmp_path, tiny_teacher_dir, tiny_tokenizer, storage, monkeypatch):
    fake = tmp_path / "tiny.gguf"
    fake.write_bytes(b"GGUF" + bytes(range(256)))
    calls = []

    def fake_convert(gguf, out):  # stands in for dequantising: writes an HF folder
        calls.append(gguf)
        shutil.copytree(tiny_teacher_dir, out, dirs_exist_ok=True)

    monkeypatch.setattr(teacher_load, "_convert_gguf", fake_convert)
    ref = resolve_teacher(GGUFTeacher(file=str(fake)), storage)
    folder = f"teachers/{ref.fingerprint}"
    assert ref.source == "gguf:tiny.gguf" and ref.path == storage.url(folder)
    assert ref.tokenizer_hash == tokenizer_hash(tiny_tokenizer)
    assert storage.read_json(f"{folder}/teacher.json")["teacher"]["fingerprint"] == ref.fingerprint
    assert resolve_teacher(GGUFTeacher(file=str(fake)), storage) == ref
    assert len(calls) == 1

    # A killed conversion leaves files but no marker: the folder is rebuilt from scratch.
    storage.remove(f"{folder}/teacher.json")
    storage.write_bytes(f"{folder}/stale.bin", b"half-written")
    assert resolve_teacher(GGUFTeacher(file=str(fake)), storage) == ref
    assert len(calls) == 2 and not storage.exists(f"{folder}/stale.bin")
    model, _ = load_teacher(ref, storage)
    assert model.config.n_layer == 4


# -- hub -------------------------------------------------------------------------------------------
def test_hub_teacher_offline_raises_with_the_fix(storage):
    with pytest.raises(TeacherError, match="cannot reach the Hugging Face hub.*teacher.kind=path"):
        resolve_teacher(HubTeacher(name="gpt2"), storage)


def test_hub_teacher_is_copied_once_and_fingerprinted_by_commit(tiny_teacher_dir, storage, monkeypatch):
    downloads = []
    monkeypatch.setattr(teacher_load, "_hub_commit", lambda name, revision: "a" * 40)
    monkeypatch.setattr(
        teacher_load, "_hub_download",
        lambda name, commit, out: downloads.append(commit) or shutil.copytree(tiny_teacher_dir, out, dirs_exist_ok=True),
    )
    ref = resolve_teacher(HubTeacher(name="org/tiny"), storage)
    assert ref.source == "hub:org/tiny@main" and ref.path == storage.url(f"teachers/{ref.fingerprint}")
    assert resolve_teacher(HubTeacher(name="org/tiny"), storage) == ref and downloads == ["a" * 40]

    monkeypatch.setattr(teacher_load, "_hub_commit", lambda name, revision: "b" * 40)
    assert resolve_teacher(HubTeacher(name="org/tiny"), storage).fingerprint != ref.fingerprint


# -- the real embedded teacher ---------------------------------------------------------------------
@pytest.mark.slow
def test_embedded_gguf_converts_once_and_keeps_its_logits(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    storage = Storage(str(tmp_path / "runs"))
    ref = resolve_teacher(GGUFTeacher(), storage)
    assert ref.source == "gguf:SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (ref.model_type, ref.num_layers, ref.vocab_size) == ("llama", 30, 49152)
    assert storage.exists(f"teachers/{ref.fingerprint}/teacher.json")
    # the folder keeps the GGUF file (98 MB), not a float32 copy of its weights (538 MB)
    assert storage.exists(f"teachers/{ref.fingerprint}/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert not storage.exists(f"teachers/{ref.fingerprint}/model.safetensors")

    gguf = embedded_gguf_path()
    original = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    original_tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    converted, tokenizer = load_teacher(ref, storage)
    assert tokenizer_hash(tokenizer) == tokenizer_hash(original_tokenizer) == ref.tokenizer_hash
    torch.testing.assert_close(_logits(converted, tokenizer), _logits(original, original_tokenizer), atol=1e-4, rtol=1e-4)

    def no_conversion(gguf, out):
        raise AssertionError("the committed conversion should have been reused")

    monkeypatch.setattr(teacher_load, "_convert_gguf", no_conversion)
    start = time.perf_counter()
    assert resolve_teacher(GGUFTeacher(), storage) == ref
    assert time.perf_counter() - start < 5.0
