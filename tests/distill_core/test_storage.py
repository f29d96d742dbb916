import pytest

from distill_core.storage import Storage, fingerprint


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
