"""Data-parallel training: 2 gloo processes under torchrun follow the single-process trajectory,
and a checkpoint written by them resumes in one process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from distill_core import train_cli
from distill_core.batches import Batch
from distill_core.config import parse_config
from distill_core.data import prepare_data
from distill_core.distributed import World
from distill_core.errors import ConfigError
from distill_core.losses.signals import TopKTargets
from distill_core.run_record import RunRecord
from distill_core.storage import Storage
from distill_core.teacher.load import load_teacher, load_tokenizer, resolve_teacher
from distill_core.teacher.topk import cache_topk

REPO = Path(__file__).resolve().parents[2]
RUN = "ddp"


def _config(root: Path, teacher_dir: Path, **train) -> dict:
    return {
        "storage": {"root": str(root)},
        "teacher": {"kind": "path", "path": str(teacher_dir)},
        "data": {"seq_len": 24, "max_train_sequences": 32, "max_validation_sequences": 4, "rows_per_shard": 8},
        "topk": {"k": 4, "batch_size": 8},
        "student": {"init": "teacher_layers", "layers": [0, 3]},
        # grad_accum 2 exercises DDP's no_sync; the global batch is 4 x 2 rows per step at any world size.
        "train": {"steps": 6, "batch_size": 4, "grad_accum": 2, "lr": 3e-3, "warmup_steps": 1,
                  "checkpoint_every": 2, "keep_final_checkpoints": True, "device": "cpu", "baseline": False, **train},
        "registry": {"name": "tiny"},
    }


def _prepared_run(root: Path, teacher_dir: Path, **train) -> Path:
    """A run record with the teacher, prepare_data and cache_topk stages done; returns its config file."""
    raw = _config(root, teacher_dir, **train)
    cfg = parse_config(raw)
    storage = Storage(str(root))
    record = RunRecord(storage, RUN)
    record.save_config(cfg)
    teacher = resolve_teacher(cfg.teacher, storage)
    data = prepare_data(cfg.data, load_tokenizer(teacher, storage), teacher.tokenizer_hash, storage)
    cache = cache_topk(lambda: load_teacher(teacher, storage)[0], data, teacher.to_dict(), cfg.topk, storage)
    record.write_stage("teacher", teacher.to_dict())
    record.write_stage("prepare_data", data.to_dict())
    record.write_stage("cache_topk", cache.to_dict())
    return _write_config(root, raw)


def _write_config(root: Path, raw: dict) -> Path:
    path = root.parent / f"{root.name}.yaml"
    path.write_text(yaml.safe_dump({**raw, "storage": {"root": str(root)}}))
    return path


def _trained(root: Path) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Full loss history and final weights of the run's student."""
    folder = json.loads((root / f"runs/{RUN}/stages/train_student.json").read_text())["student"]["model_folder"]
    history = json.loads((root / folder / "train.json").read_text())["result"]["history"]
    return history, load_file(root / folder / "model.safetensors")


def _assert_same_training(a, b) -> None:
    (ha, wa), (hb, wb) = a, b
    assert [h["step"] for h in ha] == [h["step"] for h in hb] == list(range(1, 7))
    for key in ("loss", "forward_kl", "ce", "lr"):
        assert [h[key] for h in hb] == pytest.approx([h[key] for h in ha], rel=1e-4, abs=1e-7), key
    assert wa.keys() == wb.keys()
    for k in wa:
        # atol 1e-4, not 1e-5: DDP averages gradients in another float order than one process, and
        # AdamW's g/√v turns that into a few 1e-5 after 6 steps (lr 3e-3) where a weight's gradients are
        # tiny; measured up to 5.5e-5 on one element of 3,072 (the fused head sums in chunks).
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-4)


# loss_chunk_rows: the fused head + loss runs the model through DDP's forward, so gradients still sync.
@pytest.mark.parametrize("train", [{}, {"loss_chunk_rows": 7}], ids=["logits", "fused"])
def test_two_gloo_processes_match_one_and_resume_in_one(tmp_path, tiny_teacher_dir, train):
    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    config_one = _prepared_run(one, tiny_teacher_dir, **train)
    shutil.copytree(one, two)
    config_two = _write_config(two, _config(two, tiny_teacher_dir, **train))

    assert train_cli.main([str(config_one), "--run-id", RUN]) == 0
    single = _trained(one)
    assert single[0][-1]["loss"] < single[0][0]["loss"]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "distill_core.train_cli", str(config_two), "--run-id", RUN]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("student: students/") == 1  # only rank 0 reports
    _assert_same_training(single, _trained(two))

    # The 2-process run's checkpoint resumes in one process: drop its final model, keep the latest
    # checkpoint (step 4; rank 0 pruned step 2 once step 4 was committed)
    shutil.copytree(two, resumed)
    folder = json.loads((resumed / f"runs/{RUN}/stages/train_student.json").read_text())["student"]["model_folder"]
    student_dir = resumed / Path(folder).parent
    assert sorted(p.name for p in (student_dir / "checkpoints").iterdir()) == ["step-000004"]
    shutil.rmtree(student_dir / "model")
    (resumed / f"runs/{RUN}/stages/train_student.json").unlink()
    config_resumed = _write_config(resumed, _config(resumed, tiny_teacher_dir, **train))
    assert train_cli.main([str(config_resumed), "--run-id", RUN]) == 0
    _assert_same_training(single, _trained(resumed))


def test_shard_takes_equal_row_slices():
    ids = torch.arange(4 * 5).reshape(4, 5)
    targets = TopKTargets(torch.zeros(4, 4, 2, dtype=torch.int64), torch.zeros(4, 4, 2), torch.arange(16.0).reshape(4, 4))
    batch = Batch(ids, torch.ones(4, 4, dtype=torch.bool), targets)
    assert World().shard(batch) is batch
    part = World(rank=1, size=2).shard(batch)
    assert torch.equal(part.input_ids, ids[2:]) and torch.equal(part.targets.tail_logprob, targets.tail_logprob[2:])
    with pytest.raises(ConfigError, match="batch_size 4 is not a multiple of the 3 training processes"):
        World(rank=0, size=3).shard(batch)


def test_cli_needs_the_earlier_stages(tmp_path, tiny_teacher_dir, capsys):
    raw = _config(tmp_path / "root", tiny_teacher_dir)
    path = _write_config(tmp_path / "root", raw)
    assert train_cli.main([str(path), "--run-id", RUN]) == 2
    assert "stage 'teacher' has not finished" in capsys.readouterr().err
