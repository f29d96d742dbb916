import pytest


@pytest.fixture(scope="session", autouse=True)
def prefect_api():
    """A real Prefect API on a temporary SQLite database for every flow test."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def tiny_config(tmp_path, tiny_teacher_dir):
    """A run config over the tiny random teacher: every stage runs in seconds."""
    from distill_core.config import parse_config

    return parse_config({
        "storage": {"root": str(tmp_path / "root")},
        "teacher": {"kind": "path", "path": str(tiny_teacher_dir)},
        "data": {"seq_len": 32, "max_train_sequences": 48, "max_validation_sequences": 8, "rows_per_shard": 16},
        "topk": {"k": 8, "batch_size": 8},
        "student": {"init": "teacher_layers", "layers": [0, 3]},
        "train": {"steps": 6, "batch_size": 4, "warmup_steps": 1, "checkpoint_every": 2},
        "eval": {"max_sequences": 8, "batch_size": 4, "speed_tokens": 64},
        "registry": {"name": "tiny"},
    })
