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

    One student forward per source serves every term on that source; terms whose source has no batch
    this step are left out (a step of an on-policy round trains either the graded student samples or the
    other sources, see :mod:`distill_core.rounds`). ``temperatures`` maps a
    source to the temperature its soft targets were taken at (1 when absent); ``length_penalty`` normalises the
    student's beam-candidate scores as the teacher's were. ``chunk_rows`` (``train.loss_chunk_rows``): the
    student runs only its body and the LM head and losses are computed that many positions at a time
    (``losses.fused``), so no [B·T, V] logits exist; the values and gradients are the same. The terms'
    values are then detached (logged, not differentiated); the total carries the gradient."""
    total: torch.Tensor | float = 0.0
    parts: dict[str, torch.Tensor] = {}
    for source in dict.fromkeys(t.source for t in terms if t.source in batch):
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
            ce = token_cross_entropy(out, labels, b.loss_mask) if ranked or any(t.name in _CE_NAMES for t in own) else None
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
    return f"{term.name}@{term.on}" if term.on != "data" else term.name


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
    until: int | None = None,
) -> TrainResult:
    """Train ``student`` for ``cfg.steps`` optimizer steps and save it under ``out``.

    ``until``: stop after that step instead (a round of :mod:`distill_core.rounds`), with a checkpoint
    there; ``student`` then holds the weights of that step and the result's ``model_folder`` is that
    checkpoint. A later call resumes from it, on the same learning-rate schedule (over ``cfg.steps``).

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
    end = cfg.steps if until is None else until
    if not 0 < end <= cfg.steps or start > end:
        raise ConfigError(f"training {out} to step {end} of {cfg.steps}, but its latest checkpoint is at step {start}: "
                          "a stage of a later round ran; rerun the rounds from the first unfinished one.")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    stream = batches(start * cfg.grad_accum)
    tokens, t0 = 0, time.perf_counter()
    for step in range(start, end):
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
        if ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == end) and step + 1 < cfg.steps:
            if world.is_main:
                checkpoints.save_checkpoint(student, optimizer, scheduler, history, storage, out, step + 1,
                                            keep=cfg.keep_checkpoints)
            world.barrier()
        if fail_at_step is not None and step + 1 == fail_at_step:
            raise RuntimeError(f"injected failure after step {fail_at_step}")
    seconds = time.perf_counter() - t0
    tokens = world.sum(tokens)
    if end < cfg.steps:
        return TrainResult(checkpoints.checkpoint_dir(out, end), end, history[-1]["loss"], history, seconds,
                           tokens / max(seconds, 1e-9), init, resumed_from_step=start or None)
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
    ignored = {"baseline", "losses", "device", "loss_chunk_rows", "compile", "keep_checkpoints", "keep_final_checkpoints"}
    if not any(t.source == "student_samples" for t in terms):  # e.g. the CE-only baseline of an on-policy run
        ignored |= {"rounds", "round_steps", "on_policy_fraction"}
    train = train_cfg.model_dump(exclude=ignored)
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
    from distill_core.batches import step_batches

    used, inputs = used_caches(name, terms, caches or {}, teacher_ref, data)
    own_tokenizer = student_own_tokenizer(student_cfg, storage, teacher_ref)
    if own_tokenizer is not None:
        from distill_core.teacher.load import tokenizer_hash

        inputs["student_tokenizer"] = tokenizer_hash(own_tokenizer)  # what the name points at, not the name
    out = student_folder(name, student_cfg, train_cfg, terms, inputs)
    if (done := finished(storage, out, train_cfg)) is not None:
        return done
    if own_tokenizer is not None:
        return _train_own_tokenizer(name, terms, student_cfg, train_cfg, storage, teacher_ref, data, used, own_tokenizer,
                                    out, progress, fail_at_step)
    student, tokenizer, init = initial_student(student_cfg, train_cfg, storage, teacher_ref, data)
    batches = step_batches(source_streams(terms, storage, data, used, train_cfg), train_cfg.batch_size,
                           pad_id=tokenizer.pad_token_id)
    return train(student, batches, train_cfg, terms, storage, out, temperatures=source_temperatures(used, train_cfg),
                 length_penalty=used["beams"].meta["length_penalty"] if "beams" in used else 1.0,
                 tokenizer=tokenizer, progress=progress, fail_at_step=fail_at_step, init=init)


def used_caches(name: str, terms: list[LossTerm], caches: dict, teacher_ref, data) -> tuple[dict, dict]:
    """The teacher caches these terms train on ({kind: CacheRef}, each checked against the teacher and
    data), and the inputs that address the student trained on them. The graded student samples of
    on-policy rounds are not among them: each round writes its own."""
    from distill_core.cache.ref import check_compatible

    sources = {t.source for t in terms}
    needed = {"topk": any(t.source == "data" and t.name != "ce" for t in terms), "samples": "samples" in sources, "beams": "beams" in sources}
    for kind, need in needed.items():
        if need and kind not in caches:
            raise CacheError(f"student {name!r} has loss terms on the {kind} cache, but none was given: run cache_{kind} first.")
    used = {kind: caches[kind] for kind, need in needed.items() if need}
    for cache in used.values():
        check_compatible(cache, data, teacher_ref.fingerprint)
    inputs = {"teacher": teacher_ref.fingerprint, "data": data.fingerprint, "caches": {k: c.fingerprint for k, c in used.items()}}
    return used, inputs


def student_own_tokenizer(student_cfg, storage: Storage, teacher_ref):
    """The tokenizer ``student.tokenizer`` names when it differs from the teacher's, else None (unset, or
    the teacher's tokenizer under another name: distillation per token id, as without it)."""
    if student_cfg.tokenizer is None:
        return None
    from distill_core.student import load_student_tokenizer, tokenizer_case
    from distill_core.teacher.load import load_tokenizer

    own = load_student_tokenizer(student_cfg.tokenizer, storage)
    return None if tokenizer_case(load_tokenizer(teacher_ref, storage), own) == "same" else own


def initial_student(student_cfg, train_cfg: TrainConfig, storage: Storage, teacher_ref, data, student_tokenizer=None):
    """(student, tokenizer, init record or None): the student ``student_cfg`` builds from the teacher;
    with ``student_tokenizer`` (its own, other than the teacher's) its vocabulary is that tokenizer's and
    the tokenizer returned is the teacher's."""
    from distill_core.student import build_student, check_vocab, student_from_pretrained
    from distill_core.teacher.load import load_teacher, load_tokenizer

    if student_cfg.init == "pretrained" and student_tokenizer is None:
        # The teacher's weights play no part here: its ref has the vocabulary and tokenizer to check.
        student = student_from_pretrained(student_cfg.pretrained, teacher_ref.vocab_size, teacher_ref.tokenizer_hash, storage=storage)
        return student, load_tokenizer(teacher_ref, storage), None
    teacher, tokenizer = load_teacher(teacher_ref, storage)
    init = plan = None
    if student_cfg.init == "pruned":
        from distill_core.data import first_train_sequences
        from distill_core.pruning.plan import plan_of, plan_student

        record = plan_student(teacher, student_cfg, train_cfg, storage, teacher_ref.fingerprint, data.fingerprint,
                              lambda n: torch.from_numpy(first_train_sequences(storage, data, n)))
        plan = plan_of(record)
        init = {"init": "pruned", **{k: v for k, v in record.items() if k != "plan"}}
    if student_tokenizer is not None:
        student = build_student(teacher, student_cfg, seed=train_cfg.seed, plan=plan, storage=storage,
                                tokenizers=(tokenizer, student_tokenizer))
    else:
        student = build_student(teacher, student_cfg, seed=train_cfg.seed, plan=plan)
        check_vocab(student, teacher)
    return student, tokenizer, init


def source_streams(terms: list[LossTerm], storage: Storage, data, used: dict, train_cfg: TrainConfig) -> dict:
    """{source: RowStream} for the data, samples and beams sources of ``terms``."""
    from distill_core.batches import beams_stream, samples_stream, topk_stream

    sources, seed = {t.source for t in terms}, train_cfg.seed
    streams = {}
    if "data" in sources:
        streams["data"] = topk_stream(storage, data, used.get("topk"), seed=seed, temperature=_topk_temperature(used.get("topk"), train_cfg))
    if "samples" in sources:
        streams["samples"] = samples_stream(storage, data, used["samples"], seed=seed)
    if "beams" in sources:
        streams["beams"] = beams_stream(storage, data, used["beams"], seed=seed)
    return streams


def source_temperatures(used: dict, train_cfg: TrainConfig) -> dict[str, float]:
    """The temperature each source's soft targets are taken at: the top-k cache's at train.temperature
    (or its capture temperature), samples' at their capture temperature."""
    temperatures = {"data": _topk_temperature(used.get("topk"), train_cfg)}
    if "samples" in used:
        temperatures["samples"] = used["samples"].meta["soft_temperature"]
    return temperatures


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


def _train_own_tokenizer(name, terms, student_cfg, train_cfg, storage, teacher_ref, data, used, student_tokenizer, out,
                         progress, fail_at_step) -> TrainResult:
    """:func:`train_student` for a student with its own tokenizer (``student.tokenizer``): built with its
    vocabulary, trained on the teacher rows' text in its tokens (:mod:`distill_core.retokenize`), saved
    with its tokenizer."""
    from distill_core.batches import collate_beams, step_batches
    from distill_core.retokenize import Retokenizer

    strategy = used["topk"].meta.get("strategy", "topk") if "topk" in used else "topk"
    if strategy != "topk":
        raise ConfigError(f"student.tokenizer carries the teacher's top-k across vocabularies, but this top-k cache holds "
                          f"{strategy!r} targets: set topk.strategy to 'topk', or leave student.tokenizer unset.")
    student, teacher_tokenizer, init = initial_student(student_cfg, train_cfg, storage, teacher_ref, data, student_tokenizer)
    context = getattr(student.config, "n_positions", None) or getattr(student.config, "max_position_embeddings", None)
    retok = Retokenizer(teacher_tokenizer, student_tokenizer, max_len=context)
    pad = student_tokenizer.pad_token_id
    streams = source_streams(terms, storage, data, used, train_cfg)
    collate = {"data": lambda rows: retok.collate_data(rows, pad), "samples": lambda rows: retok.collate_samples(rows, pad),
               "beams": lambda rows: collate_beams(rows, pad, samples=lambda flat: retok.collate_samples(flat, pad))}
    batches = step_batches(streams, train_cfg.batch_size, pad_id=pad, collate={k: v for k, v in collate.items() if k in streams})
    return train(student, batches, train_cfg, terms, storage, out, temperatures=source_temperatures(used, train_cfg),
                 length_penalty=used["beams"].meta["length_penalty"] if "beams" in used else 1.0,
                 tokenizer=student_tokenizer, progress=progress, fail_at_step=fail_at_step, init=init)
