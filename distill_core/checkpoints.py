"""Resumable training checkpoints: save, find the latest, resume, prune.

A checkpoint is ``<out>/checkpoints/step-NNNNNN/`` holding ``state.pt`` (model, optimizer,
scheduler and RNG state) and ``checkpoint.json`` (step and loss history). The marker is written last
and removed first, so a folder counts as a checkpoint only while its marker is there: a process killed
while saving or pruning always leaves the latest committed checkpoint whole.
"""

from __future__ import annotations

import io
import logging

import torch

from distill_core.storage import Storage

MARKER = "checkpoint.json"
log = logging.getLogger(__name__)


def checkpoint_dir(out: str, step: int) -> str:
    return f"{out}/checkpoints/step-{step:06d}"


def committed_steps(storage: Storage, out: str) -> list[int]:
    """Steps of the checkpoints whose marker was written, ascending."""
    return sorted(
        int(name.split("-")[1])
        for name in storage.listdir(f"{out}/checkpoints")
        if name.startswith("step-") and storage.exists(f"{out}/checkpoints/{name}/{MARKER}")
    )


def latest_checkpoint(storage: Storage, out: str) -> int | None:
    """The highest step whose checkpoint marker was written, else None."""
    steps = committed_steps(storage, out)
    return steps[-1] if steps else None


def save_checkpoint(student, optimizer, scheduler, history: list[dict], storage: Storage, out: str, step: int,
                    *, keep: int) -> None:
    """Commit the checkpoint of ``step``, then prune to the latest ``keep`` (>= 1) checkpoints."""
    folder = checkpoint_dir(out, step)
    state = {
        "model": student.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    storage.write_bytes(f"{folder}/state.pt", buf.getvalue())
    storage.write_json(f"{folder}/{MARKER}", {"step": step, "history": history})
    prune_checkpoints(storage, out, keep)


def resume(student, optimizer, scheduler, storage: Storage, out: str) -> tuple[int, list[dict]]:
    """Load the latest checkpoint into the given objects; returns (its step, its loss history),
    or (0, []) when there is none."""
    step = latest_checkpoint(storage, out)
    if step is None:
        return 0, []
    folder = checkpoint_dir(out, step)
    log.info("resuming %s from step %d (checkpoint %s)", out, step, storage.url(folder))
    state = torch.load(storage.bytes_io(f"{folder}/state.pt"), map_location="cpu", weights_only=True)
    student.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return step, storage.read_json(f"{folder}/{MARKER}")["history"]


def prune_checkpoints(storage: Storage, out: str, keep: int) -> None:
    """Remove every checkpoint folder but the latest ``keep`` committed ones (``keep=0``: all of them),
    unfinished folders of a killed save included."""
    kept = {f"step-{s:06d}" for s in committed_steps(storage, out)[-keep:]} if keep else set()
    for name in storage.listdir(f"{out}/checkpoints"):
        if name.startswith("step-") and name not in kept:
            storage.remove(f"{out}/checkpoints/{name}/{MARKER}")  # uncommit first: never a marker without its state
            storage.remove(f"{out}/checkpoints/{name}", recursive=True)
    if not keep:
        storage.remove(f"{out}/checkpoints", recursive=True)
