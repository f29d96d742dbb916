import copy
import logging

import pytest
import torch
from safetensors.torch import load_file

from distill_core.checkpoints import checkpoint_dir, latest_checkpoint, prune_checkpoints
from distill_core.config import LossTerm, StudentConfig, TrainConfig
from distill_core.train import student_folder, train

TERMS = [LossTerm(name="forward_kl", weight=0.5), LossTerm(name="ce", weight=0.5)]
CFG = TrainConfig(steps=5, batch_size=4, checkpoint_every=2, warmup_steps=1, device="cpu")


def _weights(storage, out):
    return load_file(storage.local_path(f"{out}/model/model.safetensors"))


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_interrupted_training_resumes_to_the_same_weights_and_says_so(topk_run, tiny_teacher, caplog):
    storage, batches = topk_run
    with pytest.raises(RuntimeError, match="injected"):
        train(copy.deepcopy(tiny_teacher), batches, CFG, TERMS, storage, "students/a", fail_at_step=3)
    assert latest_checkpoint(storage, "students/a") == 2
    with caplog.at_level(logging.INFO, logger="distill_core.checkpoints"):
        resumed = train(copy.deepcopy(tiny_teacher), batches, CFG, TERMS, storage, "students/a")
    assert f"resuming students/a from step 2 (checkpoint {storage.url('students/a/checkpoints/step-000002')})" in caplog.messages
    straight = train(copy.deepcopy(tiny_teacher), batches, CFG, TERMS, storage, "students/b")
    assert resumed.resumed_from_step == 2 and straight.resumed_from_step is None
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in straight.history], rel=1e-6)
    assert _same(_weights(storage, "students/a"), _weights(storage, "students/b"))
    assert storage.exists("students/a/loss_curve.png")
    # the final model is committed: no checkpoint is kept by default
    assert storage.listdir("students/a") == storage.listdir("students/b") == ["loss_curve.png", "model"]
    again = train(copy.deepcopy(tiny_teacher), batches, CFG, TERMS, storage, "students/a")
    assert again == resumed  # a finished student is returned, not retrained


def test_only_the_latest_checkpoints_are_kept_while_training(topk_run, tiny_teacher):
    storage, batches = topk_run
    cfg = CFG.model_copy(update={"steps": 9, "keep_checkpoints": 2, "keep_final_checkpoints": True})
    seen = {}
    train(copy.deepcopy(tiny_teacher), batches, cfg, TERMS, storage, "students/k",
          progress=lambda step, total, record: seen.setdefault(step, storage.listdir("students/k/checkpoints")))
    # progress runs before the step's own checkpoint: step s sees the folders after step s - 1
    assert seen[3] == ["step-000002"] and seen[5] == ["step-000002", "step-000004"]
    assert seen[7] == ["step-000004", "step-000006"] and seen[9] == ["step-000006", "step-000008"]
    assert storage.listdir("students/k/checkpoints") == ["step-000006", "step-000008"]  # kept, as asked


def test_a_kill_while_pruning_leaves_the_new_checkpoint_resumable(topk_run, tiny_teacher, monkeypatch):
    storage, batches = topk_run
    real_remove = storage.remove

    def killed(rel, recursive=False):
        raise KeyboardInterrupt(f"killed while removing {rel}")

    monkeypatch.setattr(storage, "remove", killed)
    with pytest.raises(KeyboardInterrupt, match="step-000002/checkpoint.json"):
        train(copy.deepcopy(tiny_teacher), batches, CFG, TERMS, storage, "students/p")
    assert latest_checkpoint(storage, "students/p") == 4  # step 4 was committed before step 2 was removed
    monkeypatch.setattr(storage, "remove", real_remove)
    resumed = train(copy.deepcopy(tiny_teacher), batches, CFG, TERMS, storage, "students/p")
    train(copy.deepcopy(tiny_teacher), batches, CFG, TERMS, storage, "students/q")  # uninterrupted
    assert resumed.resumed_from_step == 4 and _same(_weights(storage, "students/p"), _weights(storage, "students/q"))
    assert not storage.exists("students/p/checkpoints")


def test_checkpoints_left_by_a_kill_after_the_model_was_committed_go_on_the_next_call(topk_run, tiny_teacher, monkeypatch):
    from distill_core import checkpoints

    storage, batches = topk_run
    real = checkpoints.prune_checkpoints
    monkeypatch.setattr(checkpoints, "prune_checkpoints", lambda s, o, keep: None if keep == 0 else real(s, o, keep))
    first = train(copy.deepcopy(tiny_teacher), batches, CFG, TERMS, storage, "students/k")  # "killed" before the deletion
    assert latest_checkpoint(storage, "students/k") == 4
    monkeypatch.setattr(checkpoints, "prune_checkpoints", real)
    assert train(copy.deepcopy(tiny_teacher), batches, CFG, TERMS, storage, "students/k") == first
    assert storage.listdir("students/k") == ["loss_curve.png", "model"]


def test_prune_keeps_the_latest_committed_and_drops_unfinished_saves(tmp_path):
    from distill_core.storage import Storage

    storage = Storage(str(tmp_path))
    for step, committed in ((2, True), (4, True), (6, False)):  # step 6: a save killed before its marker
        storage.write_bytes(f"{checkpoint_dir('s', step)}/state.pt", b"state")
        if committed:
            storage.write_json(f"{checkpoint_dir('s', step)}/checkpoint.json", {"step": step, "history": []})
    assert latest_checkpoint(storage, "s") == 4
    prune_checkpoints(storage, "s", keep=1)
    assert storage.listdir("s/checkpoints") == ["step-000004"]
    prune_checkpoints(storage, "s", keep=0)
    assert not storage.exists("s/checkpoints")


def test_retention_settings_do_not_change_the_student_address():
    inputs = {"teacher": "t", "data": "d", "caches": {}}
    base = student_folder("student", StudentConfig(), TrainConfig(), TERMS, inputs)
    kept = TrainConfig(keep_checkpoints=3, keep_final_checkpoints=True)
    assert student_folder("student", StudentConfig(), kept, TERMS, inputs) == base
    assert student_folder("student", StudentConfig(), TrainConfig(steps=121), TERMS, inputs) != base


def test_keep_checkpoints_must_be_at_least_one():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="keep_checkpoints"):
        TrainConfig(keep_checkpoints=0)
