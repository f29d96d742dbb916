import s3fs


def test_s3_listings_see_what_other_processes_wrote(s3_storage):
    s3_storage.write_bytes("f/a", b"1")
    assert s3_storage.listdir("f") == ["a"]
    # Another process (a Dask worker) has its own client and cache; it writes beside our listing.
    other = s3fs.S3FileSystem(skip_instance_cache=True, **s3_storage.storage_options)
    other.pipe_file(s3_storage.url("f/b"), b"2")
    assert s3_storage.listdir("f") == ["a", "b"]
    assert s3_storage.exists("f/b") and s3_storage.size("f/b") == 1
