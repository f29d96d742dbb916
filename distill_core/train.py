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

from distill_core import distributed
from distill_core.batches import StepBatch
from distill_core.config import LossTerm, TrainConfig
from distill_core.errors import CacheError
from distill_core.losses.sampled import teacher_divergence
from distill_core.losses.reduce import masked_mean
from distill_core.losses.ranking import listwise_loss, pairwise_margin_loss
from distill_core.losses.sequence import length_normalised, sequence_logprob, token_cross_entropy
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
    init: dict | None = None  # how the student was initialised, when there is more to say than the config (pruning)


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


def loss_step(
    student, batch: StepBatch, terms: list[LossTerm], *, tail: str, temperatures: dict[str, float], length_penalty: float = 1.0,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the loss terms on one step's batches, and each term's (unweighted) value.

    One student forward per source serves every term on that source. ``temperatures`` maps a
    source to the temperature its soft targets were taken at (1 when absent); ``length_penalty`` normalises the
    student's beam-candidate scores as the teacher's were."""
    logits: dict[str, torch.Tensor] = {}
    parts = {}
    for term in terms:
        b = batch[term.source]
        if term.source not in logits:
            logits[term.source] = student(input_ids=b.input_ids).logits[:, :-1]
        out, labels = logits[term.source], b.input_ids[:, 1:]
        if term.name in ("ce", "seqkd"):
            value = masked_mean(token_cross_entropy(out, labels, b.loss_mask), b.loss_mask)
        elif term.name == "beam_top1":
            mask = b.loss_mask & b.is_top1[:, None]
            value = masked_mean(token_cross_entropy(out, labels, mask), mask)
        elif term.name == "beam_rank":
            sum_lp, n_tokens = sequence_logprob(out, labels, b.loss_mask)
            scores = length_normalised(sum_lp, n_tokens, length_penalty).view_as(b.teacher_scores)
            if term.ranking == "listwise":
                per_prompt = listwise_loss(scores, b.teacher_scores, b.valid, term.rank_temperature)
            else:
                per_prompt = pairwise_margin_loss(scores, b.teacher_scores, b.valid, term.margin)
            value = per_prompt.mean()
        else:
            if b.targets is None:
                raise CacheError(f"loss {term.name!r} needs the teacher's top-k on {term.source}, but that cache has none.")
            per_token = teacher_divergence(term.name, out, b.targets, tail=tail, temperature=temperatures.get(term.source, 1.0),
                                          beta=term.beta, chunk_rows=chunk_rows)
            value = masked_mean(per_token, b.loss_mask)
        parts[_part_name(term)] = value
    total = sum(t.weight * parts[_part_name(t)] for t in terms)
    return total, parts


def _part_name(term: LossTerm) -> str:
    return f"{term.name}@samples" if term.on == "samples" else term.name


def train(
    student,
    batches: Callable[[int], Iterator[Batch]],
    cfg: TrainConfig,
    terms: list[LossTerm],
    storage: Storage,
    out: str,
    *,
    temperatures: dict[str, float] | None = None,
    length_penalty: float = 1.0,
    tokenizer=None,
    progress: Progress | None = None,
    fail_at_step: int | None = None,
    init: dict | None = None,
) -> TrainResult:
    """Train ``student`` for ``cfg.steps`` optimizer steps and save it under ``out``.

    ``batches(skip)`` yields micro-batches after skipping ``skip`` of them (resume support).
    ``fail_at_step`` raises after that step's checkpoint logic: used by fault-injection tests.
    Under torchrun this trains with DDP (see :mod:`distill_core.distributed`): ``batches`` yields the
    same global micro-batches on every rank, each rank trains on its slice, and rank 0 writes.
    """
    if storage.exists(f"{out}/model/{FINISHED}"):
        return TrainResult(**storage.read_json(f"{out}/model/{FINISHED}")["result"])
    device = resolve_device(cfg.device)
    world = distributed.init(device)  # rank 0 of 1 outside torchrun: every world.* call is then a no-op
    device = world.device(device)
    torch.manual_seed(cfg.seed)
    student.to(device).train()
    model = world.wrap(student)  # forward/backward through DDP; `student` (unwrapped) is what gets saved
    if cfg.compile:
        model = torch.compile(model)  # shares `student`'s parameters; batch shapes may vary (dynamic after a recompile)
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, cfg))
    start, history = _resume(student, optimizer, scheduler, storage, out)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    stream = batches(start * cfg.grad_accum)
    tokens, t0 = 0, time.perf_counter()
    for step in range(start, cfg.steps):
        optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            batch = world.shard(next(stream)).to(device)
            with world.grad_sync(model, micro + 1 == cfg.grad_accum):
                with autocast:
                    loss, parts = loss_step(
                        model, batch, terms, tail=cfg.tail, temperatures=temperatures or {}, length_penalty=length_penalty,
                        chunk_rows=cfg.loss_chunk_rows,
                    )
                (loss / cfg.grad_accum).backward()
            tokens += batch.num_tokens
            for name, value in [("loss", loss), *parts.items()]:
                # .item() is a device sync; once per micro-batch is cheap next to the step itself.
                sums[name] = sums.get(name, 0.0) + value.item() / cfg.grad_accum
        sums = world.mean(sums)
        torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        record = {"step": step + 1, "lr": scheduler.get_last_lr()[0], **sums}
        history.append(record)
        if progress:
            progress(step + 1, cfg.steps, record)
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            if world.is_main:
                _save_checkpoint(student, optimizer, scheduler, history, storage, out, step + 1)
            world.barrier()
        if fail_at_step is not None and step + 1 == fail_at_step:
            raise RuntimeError(f"injected failure after step {fail_at_step}")
    seconds = time.perf_counter() - t0
    tokens = world.sum(tokens)
    result = TrainResult(f"{out}/model", cfg.steps, history[-1]["loss"], history, seconds, tokens / max(seconds, 1e-9), init)
    if world.is_main:
        _save_final(student, tokenizer, storage, out, result)
    world.barrier()
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

    train = train_cfg.model_dump(exclude={"baseline", "losses", "device", "loss_chunk_rows", "compile"})  # none change the result
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
    caches: dict | None = None,
    progress: Progress | None = None,
    fail_at_step: int | None = None,
) -> TrainResult:
    """Build the student from the teacher, train it on the sources its terms need, save it.

    ``caches`` maps "topk" / "samples" / "beams" to CacheRefs; each term's source must be there."""
    from distill_core.batches import beams_stream, samples_stream, step_batches, topk_stream
    from distill_core.cache.ref import check_compatible
    from distill_core.student import build_student, check_vocab, student_from_pretrained
    from distill_core.teacher.load import load_teacher, load_tokenizer

    caches = caches or {}
    sources = sorted({t.source for t in terms})
    needed = {"topk": any(t.source == "data" and t.name != "ce" for t in terms), "samples": "samples" in sources, "beams": "beams" in sources}
    for kind, need in needed.items():
        if need and kind not in caches:
            raise CacheError(f"student {name!r} has loss terms on the {kind} cache, but none was given: run cache_{kind} first.")
    used = {kind: caches[kind] for kind, need in needed.items() if need}
    for cache in used.values():
        check_compatible(cache, data, teacher_ref.fingerprint)
    inputs = {"teacher": teacher_ref.fingerprint, "data": data.fingerprint, "caches": {k: c.fingerprint for k, c in used.items()}}
    out = student_folder(name, student_cfg, train_cfg, terms, inputs)
    if storage.exists(f"{out}/model/{FINISHED}"):
        return TrainResult(**storage.read_json(f"{out}/model/{FINISHED}")["result"])
    if student_cfg.init == "pretrained":
        # The teacher's weights play no part here: its ref has the vocabulary and tokenizer to check.
        student = student_from_pretrained(student_cfg.pretrained, teacher_ref.vocab_size, teacher_ref.tokenizer_hash, storage=storage)
        tokenizer = load_tokenizer(teacher_ref, storage)
        init = None
    else:
        teacher, tokenizer = load_teacher(teacher_ref, storage)
        init = plan = None
        if student_cfg.init == "pruned":
            from distill_core.data import first_train_sequences
            from distill_core.pruning.plan import plan_of, plan_student

            record = plan_student(teacher, student_cfg, train_cfg, storage, teacher_ref.fingerprint, data.fingerprint,
                                  lambda n: torch.from_numpy(first_train_sequences(storage, data, n)))
            plan = plan_of(record)
            init = {"init": "pruned", **{k: v for k, v in record.items() if k != "plan"}}
        student = build_student(teacher, student_cfg, seed=train_cfg.seed, plan=plan)
        check_vocab(student, teacher)
        del teacher
    streams = {}
    topk_temperature = _topk_temperature(used.get("topk"), train_cfg)
    if "data" in sources:
        streams["data"] = topk_stream(storage, data, used.get("topk"), seed=train_cfg.seed, temperature=topk_temperature)
    if "samples" in sources:
        streams["samples"] = samples_stream(storage, data, used["samples"], seed=train_cfg.seed)
    if "beams" in sources:
        streams["beams"] = beams_stream(storage, data, used["beams"], seed=train_cfg.seed)
    temperatures = {"data": topk_temperature}
    if "samples" in used:
        temperatures["samples"] = used["samples"].meta["soft_temperature"]
    length_penalty = used["beams"].meta["length_penalty"] if "beams" in used else 1.0
    batches = step_batches(streams, train_cfg.batch_size, pad_id=tokenizer.pad_token_id)
    return train(student, batches, train_cfg, terms, storage, out, temperatures=temperatures, length_penalty=length_penalty,
                 tokenizer=tokenizer, progress=progress, fail_at_step=fail_at_step, init=init)


def _topk_temperature(cache, train_cfg: TrainConfig) -> float:
    """The distillation temperature on the top-k cache: train.temperature, else the cache's capture temperature.

    Refuses one the cache does not serve (a cache made before topk.temperatures serves its own only)."""
    if cache is None:
        return 1.0
    served = cache.meta.get("temperatures", [cache.meta["temperature"]])
    tau = cache.meta["temperature"] if train_cfg.temperature is None else train_cfg.temperature
    if not any(abs(float(tau) - float(t)) <= 1e-9 for t in served):
        raise CacheError(f"train.temperature {tau} is not served by the top-k cache {cache.folder}, which serves {served}: "
                         f"train at one of them, or capture again with {tau} in topk.temperatures.")
    return float(tau)
