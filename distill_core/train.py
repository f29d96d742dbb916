"""The student training loop: setup, loss step, train, checkpoint, resume.

Checkpoints (see :mod:`distill_core.checkpoints`) go to ``<out>/checkpoints/``; the finished student
goes to ``<out>/model/`` in Hugging Face format with ``train.json`` written last, after which the
checkpoints are deleted unless ``train.keep_final_checkpoints``. A rerun returns the finished student
at once, or resumes from the latest checkpoint.
"""

from __future__ import annotations

import math
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from distill_core import checkpoints, distributed
from distill_core.batches import StepBatch
from distill_core.config import LossTerm, TrainConfig
from distill_core.errors import CacheError, ConfigError
from distill_core.losses.fused import HeadTerm, fused_head_loss, fused_token_ce
from distill_core.losses.sampled import teacher_divergence
from distill_core.losses.reduce import masked_mean
from distill_core.losses.ranking import listwise_loss, pairwise_margin_loss
from distill_core.losses.registry import DIVERGENCES
from distill_core.losses.sequence import length_normalised, token_cross_entropy
from distill_core.losses.uld import uld_distance
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
    resumed_from_step: int | None = None  # the checkpoint this run started from, None when it started fresh


def finished(storage: Storage, out: str, cfg: TrainConfig) -> TrainResult | None:
    """The result of the student finished under ``out``, else None. Checkpoints a run killed between
    committing the model and deleting them left behind are deleted now (unless they are to be kept)."""
    if not storage.exists(f"{out}/model/{FINISHED}"):
        return None
    if not cfg.keep_final_checkpoints:
        checkpoints.prune_checkpoints(storage, out, keep=0)
    return TrainResult(**storage.read_json(f"{out}/model/{FINISHED}")["result"])


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
    student's beam-candidate scores as the teacher's were. ``chunk_rows`` (``train.loss_chunk_rows``): the
    student runs only its body and the LM head and losses are computed that many positions at a time
    (``losses.fused``), so no [B·T, V] logits exist; the values and gradients are the same. The terms'
    values are then detached (logged, not differentiated); the total carries the gradient."""
    total: torch.Tensor | float = 0.0
    parts: dict[str, torch.Tensor] = {}
    for source in dict.fromkeys(t.source for t in terms):
        own = [t for t in terms if t.source == source]
        b = batch[source]
        labels = b.input_ids[:, 1:]
        temperature = temperatures.get(source, 1.0)
        for term in own:
            if term.name in _SOFT_NAMES and b.targets is None:
                raise CacheError(f"loss {term.name!r} needs the teacher's top-k on {term.source}, but that cache has none.")
        ranked = any(t.name == "beam_rank" for t in own)
        if chunk_rows is not None and not ranked:
            hidden, weight, bias = body_and_head(student, b.input_ids)
            head_terms = [
                HeadTerm("ce" if t.name in _CE_NAMES else t.name, t.weight, _mean_weights(_term_mask(t, b)),
                         _term_targets(t, b), temperature, t.beta)
                for t in own
            ]
            source_total, values = fused_head_loss(hidden, weight, bias, labels, head_terms, tail=tail, chunk_rows=chunk_rows)
            parts.update({_part_name(t): values[i] for i, t in enumerate(own)})
            total = total + source_total
            continue
        if chunk_rows is None:
            out = student(input_ids=b.input_ids).logits[:, :-1]
            ce = token_cross_entropy(out, labels, b.loss_mask) if any(t.name in _CE_NAMES for t in own) else None
        else:  # ranking beams is not linear in the per-token values: per-token CE, recomputed per chunk in backward
            hidden, weight, bias = body_and_head(student, b.input_ids)
            out, ce = None, fused_token_ce(hidden, weight, bias, labels, b.loss_mask, chunk_rows=chunk_rows)
        for term in own:
            if term.name in _CE_NAMES:
                mask = _term_mask(term, b)
                value = masked_mean(ce, mask)
            elif term.name == "beam_rank":
                sum_lp, n_tokens = -ce.sum(-1), b.loss_mask.sum(-1)  # sequence_logprob from the per-token CE
                scores = length_normalised(sum_lp, n_tokens, length_penalty).view_as(b.teacher_scores)
                if term.ranking == "listwise":
                    per_prompt = listwise_loss(scores, b.teacher_scores, b.valid, term.rank_temperature)
                else:
                    per_prompt = pairwise_margin_loss(scores, b.teacher_scores, b.valid, term.margin)
                value = per_prompt.mean()
            elif term.name == "uld":
                value = masked_mean(uld_distance(out, _term_targets(term, b), temperature=temperature), _term_mask(term, b))
            else:
                per_token = teacher_divergence(term.name, out, b.targets, tail=tail, temperature=temperature, beta=term.beta)
                value = masked_mean(per_token, _term_mask(term, b))
            parts[_part_name(term)] = value
            total = total + term.weight * value
    return total, parts


# Terms that are cross-entropy on their source's tokens, each under its own mask (``_term_mask``).
_CE_NAMES = ("ce", "seqkd", "beam_top1")
_SOFT_NAMES = (*DIVERGENCES, "uld")  # terms on the teacher's soft targets


def _term_mask(term: LossTerm, b) -> torch.Tensor:
    """[B, T-1] bool: the positions a term trains on (beam_top1: the teacher's best candidate only; across
    tokenizers, the soft terms: the positions that have their targets)."""
    if term.name == "beam_top1":
        return b.loss_mask & b.is_top1[:, None]
    if term.name == "uld" and getattr(b, "uld_mask", None) is not None:
        return b.uld_mask
    if term.name in DIVERGENCES and getattr(b, "soft_mask", None) is not None:
        return b.soft_mask
    return b.loss_mask


def _term_targets(term: LossTerm, b):
    """The soft targets a term compares with (None for the others): ULD's own across tokenizers."""
    if term.name == "uld":
        return b.uld_targets if getattr(b, "uld_targets", None) is not None else b.targets
    return b.targets if term.name in DIVERGENCES else None


def _mean_weights(mask: torch.Tensor) -> torch.Tensor:
    """Row weights of a masked mean (``reduce.masked_mean``): 1/count on the mask, 0 elsewhere."""
    return mask.float() / mask.sum().clamp(min=1)


def body_and_head(model, input_ids: torch.Tensor, *, setting: str = "train.loss_chunk_rows") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The student's final hidden states [B, T-1, D] (the LM head's input at every position that has a
    next token), and the head's weight [V, D] and bias [V] or None.

    The model is called whole (through a DDP or torch.compile wrapper, whose forward must run) with no
    position's logits kept, so only its body does work; its last hidden state is the head's input. ``setting``
    names the config field that asked for this, for the error a head the fused path cannot compute raises."""
    inner = getattr(model, "module", model)  # DDP keeps the model as .module (torch.compile forwards attributes)
    for name in ("final_logit_softcapping", "logit_scale"):
        if getattr(inner.config, name, None) not in (None, 1.0):
            raise ConfigError(
                f"{setting} computes the LM head from the model's hidden states, but this model's head "
                f"also applies {name} = {getattr(inner.config, name)}, which the chunked path does not: set {setting} to null."
            )
    out = model(input_ids=input_ids, output_hidden_states=True, logits_to_keep=input_ids.new_zeros(0))
    head = inner.get_output_embeddings()
    return out.hidden_states[-1][:, :-1], head.weight, head.bias


def _part_name(term: LossTerm) -> str:
    return f"{term.name}@samples" if term.on == "samples" else term.name


def train_step(
    model, student, optimizer, micros: list[StepBatch], terms: list[LossTerm], cfg: TrainConfig, *, temperatures: dict[str, float],
    length_penalty: float = 1.0, autocast=nullcontext(), grad_sync: Callable[[bool], object] = lambda last: nullcontext(),
) -> dict[str, float]:
    """One optimizer step over the micro-batches ``micros`` (gradient accumulation): each one's forward and
    ``loss_step`` under ``autocast``, backward inside ``grad_sync(is_last)``; then gradient clipping and
    ``optimizer.step()``. ``model`` is what runs forward (``student``, or its DDP / compiled wrapper);
    ``student`` owns the parameters. Returns the loss and each part, averaged over the micro-batches."""
    optimizer.zero_grad(set_to_none=True)
    sums: dict[str, float] = {}
    for micro, batch in enumerate(micros):
        with grad_sync(micro + 1 == len(micros)):
            with autocast:
                loss, parts = loss_step(model, batch, terms, tail=cfg.tail, temperatures=temperatures, length_penalty=length_penalty,
                                        chunk_rows=cfg.loss_chunk_rows)
            (loss / len(micros)).backward()
        for name, value in [("loss", loss), *parts.items()]:
            # .item() is a device sync; once per micro-batch is cheap next to the step itself.
            sums[name] = sums.get(name, 0.0) + value.item() / len(micros)
    torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
    optimizer.step()
    return sums


def train(
    student,
    batches: Callable[[int], Iterator[StepBatch]],
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
    if (done := finished(storage, out, cfg)) is not None:
        return done
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
    start, history = checkpoints.resume(student, optimizer, scheduler, storage, out)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    stream = batches(start * cfg.grad_accum)
    tokens, t0 = 0, time.perf_counter()
    for step in range(start, cfg.steps):
        micros = [world.shard(next(stream)).to(device) for _ in range(cfg.grad_accum)]
        sums = train_step(model, student, optimizer, micros, terms, cfg, temperatures=temperatures or {},
                          length_penalty=length_penalty, autocast=autocast, grad_sync=lambda last: world.grad_sync(model, last))
        tokens += sum(batch.num_tokens for batch in micros)
        sums = world.mean(sums)
        scheduler.step()
        record = {"step": step + 1, "lr": scheduler.get_last_lr()[0], **sums}
        history.append(record)
        if progress:
            progress(step + 1, cfg.steps, record)
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            if world.is_main:
                checkpoints.save_checkpoint(student, optimizer, scheduler, history, storage, out, step + 1,
                                            keep=cfg.keep_checkpoints)
            world.barrier()
        if fail_at_step is not None and step + 1 == fail_at_step:
            raise RuntimeError(f"injected failure after step {fail_at_step}")
    seconds = time.perf_counter() - t0
    tokens = world.sum(tokens)
    result = TrainResult(f"{out}/model", cfg.steps, history[-1]["loss"], history, seconds, tokens / max(seconds, 1e-9),
                         init, resumed_from_step=start or None)
    if world.is_main:
        _save_final(student, tokenizer, storage, out, result)
        if not cfg.keep_final_checkpoints:
            checkpoints.prune_checkpoints(storage, out, keep=0)  # after train.json: the model is committed
    world.barrier()
    return result


# -- final model -----------------------------------------------------------------------------------
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

    # none of these change the result
    train = train_cfg.model_dump(exclude={"baseline", "losses", "device", "loss_chunk_rows", "compile", "keep_checkpoints",
                                          "keep_final_checkpoints"})
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
    own_tokenizer = None
    if student_cfg.tokenizer is not None:
        from distill_core.student import load_student_tokenizer, tokenizer_case

        own_tokenizer = load_student_tokenizer(student_cfg.tokenizer, storage)
        if tokenizer_case(load_tokenizer(teacher_ref, storage), own_tokenizer) == "same":
            own_tokenizer = None  # the teacher's tokenizer under another name: distil per token id, as without it
        else:
            from distill_core.teacher.load import tokenizer_hash

            inputs["student_tokenizer"] = tokenizer_hash(own_tokenizer)  # what the name points at, not the name
    out = student_folder(name, student_cfg, train_cfg, terms, inputs)
    if (done := finished(storage, out, train_cfg)) is not None:
        return done
    if own_tokenizer is not None:
        return _train_own_tokenizer(name, terms, student_cfg, train_cfg, storage, teacher_ref, data, used, sources, own_tokenizer,
                                    out, progress, fail_at_step)
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


def _train_own_tokenizer(name, terms, student_cfg, train_cfg, storage, teacher_ref, data, used, sources, student_tokenizer, out,
                         progress, fail_at_step) -> TrainResult:
    """:func:`train_student` for a student with its own tokenizer (``student.tokenizer``): built with its
    vocabulary, trained on the teacher rows' text in its tokens (:mod:`distill_core.retokenize`), saved
    with its tokenizer."""
    from distill_core.batches import samples_stream, step_batches, topk_stream
    from distill_core.retokenize import Retokenizer
    from distill_core.student import build_student
    from distill_core.teacher.load import load_teacher

    strategy = used["topk"].meta.get("strategy", "topk") if "topk" in used else "topk"
    if strategy != "topk":
        raise ConfigError(f"student.tokenizer carries the teacher's top-k across vocabularies, but this top-k cache holds "
                          f"{strategy!r} targets: set topk.strategy to 'topk', or leave student.tokenizer unset.")
    topk_temperature = _topk_temperature(used.get("topk"), train_cfg)
    teacher, teacher_tokenizer = load_teacher(teacher_ref, storage)
    init = plan = None
    if student_cfg.init == "pruned":
        from distill_core.data import first_train_sequences
        from distill_core.pruning.plan import plan_of, plan_student

        record = plan_student(teacher, student_cfg, train_cfg, storage, teacher_ref.fingerprint, data.fingerprint,
                              lambda n: torch.from_numpy(first_train_sequences(storage, data, n)))
        plan = plan_of(record)
        init = {"init": "pruned", **{k: v for k, v in record.items() if k != "plan"}}
    student = build_student(teacher, student_cfg, seed=train_cfg.seed, plan=plan, storage=storage,
                            tokenizers=(teacher_tokenizer, student_tokenizer))
    del teacher
    context = getattr(student.config, "n_positions", None) or getattr(student.config, "max_position_embeddings", None)
    retok = Retokenizer(teacher_tokenizer, student_tokenizer, max_len=context)
    pad = student_tokenizer.pad_token_id
    streams, collate = {}, {}
    if "data" in sources:
        streams["data"] = topk_stream(storage, data, used.get("topk"), seed=train_cfg.seed, temperature=topk_temperature)
        collate["data"] = lambda rows: retok.collate_data(rows, pad)
    if "samples" in sources:
        streams["samples"] = samples_stream(storage, data, used["samples"], seed=train_cfg.seed)
        collate["samples"] = lambda rows: retok.collate_samples(rows, pad)
    temperatures = {"data": topk_temperature}
    batches = step_batches(streams, train_cfg.batch_size, pad_id=pad, collate=collate)
    return train(student, batches, train_cfg, terms, storage, out, temperatures=temperatures,
                 tokenizer=student_tokenizer, progress=progress, fail_at_step=fail_at_step, init=init)
