"""The student training loop: setup, loss step, train, checkpoint, resume.

Checkpoints go to ``<out>/checkpoints/step-NNNNNN/`` (state + ``checkpoint.json`` marker written
last); the finished student goes to ``<out>/model/`` in Hugging Face format with ``train.json``
written last. A rerun returns the finished student at once, or resumes from the latest checkpoint.
"""

from __future__ import annotations

import io
import math
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from distill_core.batches import Batch
from distill_core.config import LossTerm, TrainConfig
from distill_core.errors import CacheError
from distill_core.losses.divergence import sparse_divergence
from distill_core.losses.reduce import masked_mean
from distill_core.losses.sequence import token_cross_entropy
from distill_core.storage import Storage

Progress = Callable[[int, int, dict], None]
FINISHED = "train.json"


@dataclass(frozen=True)
class TrainResult:
    model_folder: str  # relative to the storage root
    steps: int
    final_loss: float
    history: list[dict]
    seconds: float
    tokens_per_second: float


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is visible: use 'auto' or 'cpu'.")
    return torch.device(name)


def lr_lambda(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_lr_ratio`` at ``cfg.steps``."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def loss_step(student, batch: Batch, terms: list[LossTerm], *, tail: str, temperature: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the loss terms on one batch, and each term's (unweighted) value."""
    logits = student(input_ids=batch.input_ids).logits[:, :-1]
    labels = batch.input_ids[:, 1:]
    parts = {}
    for term in terms:
        if term.name == "ce":
            per_token = token_cross_entropy(logits, labels, batch.loss_mask)
        else:
            if batch.targets is None:
                raise CacheError(f"loss {term.name!r} needs teacher top-k targets, but the batch has none: run cache_topk.")
            per_token = sparse_divergence(term.name, logits, batch.targets, tail=tail, temperature=temperature, beta=term.beta)
        parts[term.name] = masked_mean(per_token, batch.loss_mask)
    total = sum(t.weight * parts[t.name] for t in terms)
    return total, parts


def train(
    student,
    batches: Callable[[int], Iterator[Batch]],
    cfg: TrainConfig,
    terms: list[LossTerm],
    storage: Storage,
    out: str,
    *,
    temperature: float = 1.0,
    tokenizer=None,
    progress: Progress | None = None,
    fail_at_step: int | None = None,
) -> TrainResult:
    """Train ``student`` for ``cfg.steps`` optimizer steps and save it under ``out``.

    ``batches(skip)`` yields micro-batches after skipping ``skip`` of them (resume support).
    ``fail_at_step`` raises after that step's checkpoint logic: used by fault-injection tests.
    """
    if storage.exists(f"{out}/model/{FINISHED}"):
        return TrainResult(**storage.read_json(f"{out}/model/{FINISHED}")["result"])
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    student.to(device).train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, cfg))
    start, history = _resume(student, optimizer, scheduler, storage, out)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    stream = batches(start * cfg.grad_accum)
    tokens, t0 = 0, time.perf_counter()
    for step in range(start, cfg.steps):
        optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for _ in range(cfg.grad_accum):
            batch = next(stream).to(device)
            with autocast:
                loss, parts = loss_step(student, batch, terms, tail=cfg.tail, temperature=temperature)
            (loss / cfg.grad_accum).backward()
            tokens += batch.input_ids.numel()
            for name, value in [("loss", loss), *parts.items()]:
                # .item() is a device sync; once per micro-batch is cheap next to the step itself.
                sums[name] = sums.get(name, 0.0) + value.item() / cfg.grad_accum
        torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        record = {"step": step + 1, "lr": scheduler.get_last_lr()[0], **sums}
        history.append(record)
        if progress:
            progress(step + 1, cfg.steps, record)
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            _save_checkpoint(student, optimizer, scheduler, history, storage, out, step + 1)
        if fail_at_step is not None and step + 1 == fail_at_step:
            raise RuntimeError(f"injected failure after step {fail_at_step}")
    seconds = time.perf_counter() - t0
    result = TrainResult(f"{out}/model", cfg.steps, history[-1]["loss"], history, seconds, tokens / max(seconds, 1e-9))
    _save_final(student, tokenizer, storage, out, result)
    return result


# -- checkpoints -----------------------------------------------------------------------------------
def _checkpoint_dir(out: str, step: int) -> str:
    return f"{out}/checkpoints/step-{step:06d}"


def latest_checkpoint(storage: Storage, out: str) -> int | None:
    """The highest step whose checkpoint marker was written, else None."""
    steps = [
        int(name.split("-")[1])
        for name in storage.listdir(f"{out}/checkpoints")
        if name.startswith("step-") and storage.exists(f"{out}/checkpoints/{name}/checkpoint.json")
    ]
    return max(steps) if steps else None


def _save_checkpoint(student, optimizer, scheduler, history, storage: Storage, out: str, step: int) -> None:
    folder = _checkpoint_dir(out, step)
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
    storage.write_json(f"{folder}/checkpoint.json", {"step": step, "history": history})


def _resume(student, optimizer, scheduler, storage: Storage, out: str) -> tuple[int, list[dict]]:
    step = latest_checkpoint(storage, out)
    if step is None:
        return 0, []
    folder = _checkpoint_dir(out, step)
    state = torch.load(storage.bytes_io(f"{folder}/state.pt"), map_location="cpu", weights_only=True)
    student.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return step, storage.read_json(f"{folder}/checkpoint.json")["history"]


def _save_final(student, tokenizer, storage: Storage, out: str, result: TrainResult) -> None:
    from dataclasses import asdict

    from distill_core.plots import loss_curve_png

    student.eval()
    with tempfile.TemporaryDirectory() as tmp:
        student.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        storage.upload_dir(tmp, f"{out}/model")
    storage.write_bytes(f"{out}/loss_curve.png", loss_curve_png(result.history))
    storage.write_json(f"{out}/model/{FINISHED}", {"result": asdict(result)})


# -- stage entry point -----------------------------------------------------------------------------
def student_folder(kind: str, student_cfg, train_cfg: TrainConfig, terms: list[LossTerm], inputs: dict) -> str:
    """Content address of a trained student: its init, training settings, loss terms and inputs."""
    from distill_core.storage import fingerprint

    train = train_cfg.model_dump(exclude={"baseline", "losses", "device"})
    fp = fingerprint({"student": student_cfg.model_dump(), "train": train, "terms": [t.model_dump() for t in terms], **inputs})
    return f"students/{fp}/{kind}"


def train_student(
    name: str,
    terms: list[LossTerm],
    student_cfg,
    train_cfg: TrainConfig,
    storage: Storage,
    teacher_ref,
    data,
    cache=None,
    progress: Progress | None = None,
    fail_at_step: int | None = None,
) -> TrainResult:
    """Build the student from the teacher, train it on ``data`` (+ ``cache`` top-k), save it."""
    from distill_core.batches import to_batch, topk_stream
    from distill_core.cache.ref import check_compatible
    from distill_core.student import build_student, check_vocab
    from distill_core.teacher.load import load_teacher

    needs_cache = any(t.name != "ce" for t in terms)
    if needs_cache and cache is None:
        raise CacheError(f"student {name!r} has divergence terms but no top-k cache was given: run cache_topk first.")
    if cache is not None:
        check_compatible(cache, data, teacher_ref.fingerprint)
    inputs = {"teacher": teacher_ref.fingerprint, "data": data.fingerprint, "cache": cache.fingerprint if needs_cache else None}
    out = student_folder(name, student_cfg, train_cfg, terms, inputs)
    if storage.exists(f"{out}/model/{FINISHED}"):
        return TrainResult(**storage.read_json(f"{out}/model/{FINISHED}")["result"])
    teacher, tokenizer = load_teacher(teacher_ref, storage)
    student = build_student(teacher, student_cfg, seed=train_cfg.seed)
    check_vocab(student, teacher)
    del teacher
    stream = topk_stream(storage, data, cache if needs_cache else None, seed=train_cfg.seed)
    temperature = cache.meta["temperature"] if needs_cache else 1.0
    batches = lambda skip: (to_batch(a) for a in stream.batches(train_cfg.batch_size, skip))  # noqa: E731
    return train(student, batches, train_cfg, terms, storage, out, temperature=temperature, tokenizer=tokenizer,
                 progress=progress, fail_at_step=fail_at_step)
