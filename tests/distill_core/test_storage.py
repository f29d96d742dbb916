import json
import tracemalloc

import numpy as np
import pytest

import distill_core.storage as storage_module
from distill_core.storage import Storage, fingerprint, local_copy


def test_fingerprint_is_order_independent_and_content_sensitive():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})
    assert len(fingerprint("x")) == 16


def test_write_is_atomic_and_leaves_no_temporary_files(tmp_path):
    storage = Storage(str(tmp_path))
    storage.write_bytes("a/b.bin", b"one")
    storage.write_bytes("a/b.bin", b"two")
    assert storage.read_bytes("a/b.bin") == b"two"
    assert storage.listdir("a") == ["b.bin"]


def test_write_new_refuses_to_overwrite(tmp_path):
    storage = Storage(str(tmp_path))
    storage.write_new("x.json", b"{}")
    with pytest.raises(FileExistsError, match="immutable"):
        storage.write_new("x.json", b"[]")
    assert storage.read_bytes("x.json") == b"{}"


def test_upload_and_download_dir_round_trip(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f.txt").write_text("hi")
    storage = Storage(str(tmp_path / "root"))
    storage.upload_dir(src, "copy")
    out = storage.download_dir("copy", tmp_path / "out")
    assert (out / "sub" / "f.txt").read_text() == "hi"


def test_s3_root_reads_and_writes(s3_storage):
    s3_storage.write_json("m/manifest.json", {"k": 1})
    assert s3_storage.read_json("m/manifest.json") == {"k": 1}
    assert s3_storage.listdir("m") == ["manifest.json"]
    assert s3_storage.local_dir("m").joinpath("manifest.json").exists()


def test_local_dir_of_a_local_root_is_the_folder_itself(tmp_path):
    storage = Storage(str(tmp_path))
    assert storage.local_dir("m") == tmp_path / "m"


def test_local_dir_of_a_remote_root_is_downloaded_again_when_the_contents_change(s3_storage, tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "cache"))
    s3_storage.write_json("m/config.json", {"layers": 2})
    first = s3_storage.local_dir("m")
    assert s3_storage.local_dir("m") == first  # unchanged contents: the same copy, not fetched again
    assert first.parent == tmp_path / "cache" / "copies"

    s3_storage.write_json("m/config.json", {"layers": 4})
    second = s3_storage.local_dir("m")
    assert second != first
    assert json.loads((second / "config.json").read_text()) == {"layers": 4}
    assert json.loads((first / "config.json").read_text()) == {"layers": 2}


def test_local_dir_of_a_missing_remote_folder_raises(s3_storage, tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        s3_storage.local_dir("missing")


def test_local_copy_without_weights_skips_weight_files(s3_storage, tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "cache"))
    s3_storage.write_bytes("model/config.json", b"{}")
    s3_storage.write_bytes("model/model.safetensors", b"weights")
    s3_storage.write_bytes("model/.hidden", b"skipped")
    url = s3_storage.url("model")

    meta = local_copy(url, s3_storage, "teachers/abc", weights=False)
    assert meta == tmp_path / "cache" / "teachers" / "abc"
    assert sorted(p.name for p in meta.iterdir()) == [".complete-meta", "config.json"]

    full = local_copy(url, s3_storage, "teachers/abc")  # the same key gains the weights
    assert full == meta
    assert (full / "model.safetensors").read_bytes() == b"weights"
    assert (full / ".complete-all").is_file() and not (full / ".hidden").exists()


def _big_file(path, size=6 * 2**20):
    data = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def test_upload_dir_streams_each_file_in_chunks(tmp_path, monkeypatch):
    data = _big_file(tmp_path / "src" / "model.safetensors")
    monkeypatch.setattr(storage_module, "COPY_CHUNK", 2**16, raising=False)
    storage = Storage(str(tmp_path / "root"))
    tracemalloc.start()
    try:
        storage.upload_dir(tmp_path / "src", "teacher")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20, f"uploading a 6 MiB file allocated {peak} bytes at once"
    assert storage.read_bytes("teacher/model.safetensors") == data
    assert storage.listdir("teacher") == ["model.safetensors"]


def test_an_interrupted_upload_leaves_neither_a_partial_file_nor_a_temporary_one(tmp_path, monkeypatch):
    _big_file(tmp_path / "src" / "model.safetensors")
    storage = Storage(str(tmp_path / "root"))
    storage.write_bytes("teacher/model.safetensors", b"old")

    def fail_midway(src, dst, length):
        dst.write(src.read(length))
        raise OSError("disk full")

    monkeypatch.setattr(storage_module.shutil, "copyfileobj", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        storage.upload_dir(tmp_path / "src", "teacher")
    assert storage.listdir("teacher") == ["model.safetensors"]
    assert storage.read_bytes("teacher/model.safetensors") == b"old"


def test_upload_dir_to_s3_round_trips_a_file(s3_storage, tmp_path):
    data = _big_file(tmp_path / "src" / "w.bin")
    s3_storage.upload_dir(tmp_path / "src", "teacher")
    assert s3_storage.read_bytes("teacher/w.bin") == data and s3_storage.listdir("teacher") == ["w.bin"]
