"""Held-out quality of students trained with equal steps by each objective, on the embedded setup.

    python benchmarks/quality.py [--config deployments/demo.yaml] [--steps N] [--root DIR] [--only a,b]
                                 [--validation-sequences N] [--eval-prompts N] [--inits a,b] [--lrs x,y]
                                 [--strategies a,b] [--on-policy ROUNDS] [--cross-tokenizer VOCAB]

Rows: the teacher; a CE-only student; soft-KD (top-k forward KL + CE); SeqKD (CE on teacher
samples + CE); SeqKD + soft targets on the samples; beam_top1 (+ CE); beam_top1 + beam_rank (+ CE).
Every student has the same init, steps, batch size and learning rate; terms on teacher samples or
beams add one micro-batch from that cache per step. Columns: validation perplexity, agreement and
KL with the teacher, the teacher's NLL of each model's samples on held-out prompts, and how often a
student's top-scored beam candidate is the teacher's best. Every stage is content-addressed under
the storage root, so a rerun reuses the teacher, data, caches and finished students.

``--on-policy R``: off-policy soft KD vs on-policy rounds (reverse KL on the student's own samples
graded by the teacher, R rounds) vs the mix, with the teacher's NLL of each model's own samples on
held-out prompts (paired intervals over prompts). ``--cross-tokenizer V``: students with a V-token
byte-level BPE trained on the train split (CE-only, SeqKD, soft KD = exact-match KL + ULD + CE), in
bits per byte of the validation text.

With ``--inits`` (names from INITS, or ``all``) and ``--lrs``, every objective is trained from every
student init at every learning rate instead (equal steps and batch for all), and two more tables
compare each init at its best learning rate (lowest val ppl of its first objective) with ``every_k``
at its best, and KD with CE-only at the same init and learning rate: paired ratios of perplexity
with 95% bootstrap intervals over the validation sequences.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pyarrow as pa
import torch

from distill_core.cache.stage import run_all
from distill_core.config import LossTerm, StudentConfig, load_config
from distill_core.data import prepare_data
from distill_core.evaluate import evaluate_students, paired
from distill_core.intervals import gap_closed
from distill_core.storage import Storage
from distill_core.teacher.beams_cache import beams_job
from distill_core.teacher.load import load_teacher, load_tokenizer, resolve_teacher
from distill_core.teacher.samples_cache import samples_job
from distill_core.teacher.topk import topk_job
from distill_core.train import resolve_device, train_student

T = LossTerm
OBJECTIVES = {
    "ce_only": [T(name="ce")],
    "soft_kd": [T(name="forward_kl", weight=0.5), T(name="ce", weight=0.5)],
    "seqkd": [T(name="seqkd", weight=0.5), T(name="ce", weight=0.5)],
    "seqkd_soft": [T(name="seqkd", weight=0.25), T(name="forward_kl", on="samples", weight=0.25), T(name="ce", weight=0.5)],
    "beam_top1": [T(name="beam_top1", weight=0.5), T(name="ce", weight=0.5)],
    "beam_top1_rank": [T(name="beam_top1", weight=0.25), T(name="beam_rank", weight=0.25), T(name="ce", weight=0.5)],
}

# top-k cache strategies at about equal bytes per token on the demo (benchmarks/RESULTS.md, codec section).
TOPK_STRATEGIES = {
    "topk": {"strategy": "topk", "k": 32},
    "sampled": {"strategy": "sampled", "draws": 80},
    "hybrid": {"strategy": "hybrid", "k": 12, "draws": 24},
}

# Students of the demo's budget (about 49.6M parameters) cut from SmolLM2-135M-Instruct (30 layers,
# hidden 576, MLP 1536, 9 heads in 3 KV groups, 49,152-token tied embedding = 28.3M of the budget).
INITS = {
    "every_k": {"init": "teacher_layers", "every_k": 6},  # layers 0, 6, 12, 18, 24, 29: 49.55M
    "depth": {"init": "pruned", "num_layers": 6},  # 6 layers by block influence: 49.55M
    "width": {"init": "pruned", "num_layers": 30, "num_key_value_heads": 1, "intermediate_size": 224},  # 48.81M
    "depth_width": {"init": "pruned", "num_layers": 12, "intermediate_size": 512},  # 49.56M
    "depth_width_heads": {"init": "pruned", "num_layers": 16, "num_key_value_heads": 2, "intermediate_size": 416},  # 49.27M
    "search": {"init": "pruned", "target_params": 49_600_000},  # shape chosen by the search (±3%)
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="deployments/demo.yaml")
    parser.add_argument("--steps", type=int, default=None, help="student steps (default: the config's)")
    parser.add_argument("--root", default=None, help="storage root (default: the config's)")
    parser.add_argument("--only", default=",".join(OBJECTIVES), help="comma-separated objectives to train")
    parser.add_argument("--validation-sequences", type=int, default=None,
                        help="held-out sequences scored, and the pool of held-out prompts (default: the config's)")
    parser.add_argument("--eval-prompts", type=int, default=None, help="held-out prompts for sample/beam metrics (default: the config's)")
    parser.add_argument("--inits", default=None, help="comma-separated student inits from INITS (or 'all'): the init grid")
    parser.add_argument("--strategies", default=None, help="comma-separated top-k strategies from TOPK_STRATEGIES (or 'all')")
    parser.add_argument("--lrs", default=None, help="comma-separated peak learning rates of the init grid (default: the config's)")
    parser.add_argument("--on-policy", type=int, default=0, metavar="ROUNDS",
                        help="on-policy grid in ROUNDS rounds: off-policy soft KD vs on-policy rounds vs the mix")
    parser.add_argument("--cross-tokenizer", type=int, default=0, metavar="VOCAB",
                        help="cross-tokenizer grid: students with a byte-level BPE of VOCAB tokens trained on the train split")
    parser.add_argument("--float16-codec", action="store_true",
                        help="soft KD on the compact codec's top-k vs the same top-k in the float16 codec (the layout before codecs)")
    parser.add_argument("--round-prompts", type=int, default=48, help="prompts the student continues each round (--on-policy)")
    args = parser.parse_args()
    cfg = load_config(args.config)
    if args.validation_sequences:
        cfg = cfg.model_copy(update={
            "data": cfg.data.model_copy(update={"max_validation_sequences": args.validation_sequences}),
            "eval": cfg.eval.model_copy(update={"max_sequences": args.validation_sequences}),
        })
    if args.eval_prompts:
        cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"prompts": args.eval_prompts})})
    if cfg.samples.soft_topk == 0:
        cfg = cfg.model_copy(update={"samples": cfg.samples.model_copy(update={"soft_topk": cfg.topk.k})})
    train_cfg = cfg.train.model_copy(update={"steps": args.steps}) if args.steps else cfg.train
    objectives = {name: OBJECTIVES[name] for name in args.only.split(",")}
    storage = Storage(args.root or cfg.storage.root, cfg.storage.options)
    device = resolve_device(train_cfg.device)

    t0 = time.perf_counter()
    teacher = resolve_teacher(cfg.teacher, storage)
    data = prepare_data(cfg.data, load_tokenizer(teacher, storage), teacher.tokenizer_hash, storage)
    loaded = {}
    load = lambda: loaded.setdefault("m", load_teacher(teacher, storage, device=device, dtype=getattr(torch, teacher.dtype))[0])  # noqa: E731
    jobs = {"topk": topk_job(cfg.topk, teacher.to_dict(), data)}
    sources = {t.source for terms in objectives.values() for t in terms} | ({"samples"} if args.cross_tokenizer else set())
    if "samples" in sources:
        jobs["samples"] = samples_job(cfg.samples, teacher.to_dict(), data)
    if "beams" in sources:
        jobs["beams"] = beams_job(cfg.beams, teacher.to_dict(), data)
    caches = {}
    for kind, job in jobs.items():
        t1 = time.perf_counter()
        caches[kind] = run_all(job, load, data, storage)
        print(f"cache {kind} ready in {time.perf_counter() - t1:.0f} s")
    loaded.clear()
    print(f"teacher, data and caches ready in {time.perf_counter() - t0:.0f} s")

    if args.float16_codec:
        return float16_codec_grid(args, cfg, train_cfg, storage, teacher, data, caches, load, device)
    if args.cross_tokenizer:
        return cross_tokenizer_grid(args, cfg, train_cfg, storage, teacher, data, caches, device)
    if args.on_policy:
        return on_policy_grid(args, cfg, train_cfg, storage, teacher, data, caches, load, device)
    if args.strategies:
        return strategy_grid(args, cfg, train_cfg, storage, teacher, data, load, device)
    if args.inits:
        return init_grid(args, cfg, train_cfg, objectives, storage, teacher, data, caches, device)
    folders = {}
    for name, terms in objectives.items():
        t0 = time.perf_counter()
        folders[name] = train_student(name, terms, cfg.student, train_cfg, storage, teacher, data, caches).model_folder
        print(f"{name}: {train_cfg.steps} steps in {time.perf_counter() - t0:.0f} s")
    metrics = evaluate_students(teacher, folders, storage, data, cfg.eval, device, baseline="ce_only",
                                generation="samples" in sources, selection="beams" in sources, beams=cfg.beams)

    print(f"\nHeld-out: {metrics['teacher']['val_sequences']} validation sequences ({metrics['teacher']['val_tokens']} tokens; "
          "[95% CI]: bootstrap over them, paired for ratios and the share of the CE-only-to-teacher gap closed); "
          f"{cfg.eval.prompts} held-out prompts for "
          f"sample/beam metrics. Students: {train_cfg.steps} steps × {train_cfg.batch_size} sequences of {data.seq_len} "
          f"(+ one samples/beams micro-batch per step where used), top-k k={cfg.topk.k}.")
    print("| model | objective | val ppl [95% CI] | ppl / CE-only [95% CI] | gap closed [95% CI] | top-1 agreement | "
          "KL(teacher‖model) | teacher NLL of samples | beam selection agreement |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in ["teacher", *objectives]:
        m = metrics[name]
        terms = " + ".join(f"{t.weight}·{t.name}{'@samples' if t.on == 'samples' else ''}" for t in objectives.get(name, []))
        cells = [_ci(m, "val_ppl", "{:.1f}"), _ci(m, "ppl_ratio_vs_baseline", "{:.3f}"), _ci(m, "kd_gap_closed", "{:.0%}")]
        cells += [f"{m[k]:.3f}" if k in m else "-" for k in ("top1_agreement", "kl_to_teacher", "teacher_nll", "selection_agreement")]
        print(f"| {name} | {terms or '-'} | " + " | ".join(cells) + " |")


def init_grid(args, cfg, train_cfg, objectives, storage, teacher, data, caches, device) -> None:
    """Every objective from every init at every learning rate, then the paired comparisons."""
    names = list(INITS) if args.inits == "all" else args.inits.split(",")
    lrs = [float(x) for x in args.lrs.split(",")] if args.lrs else [train_cfg.lr]
    folders, params = {}, {}
    for init in names:
        student = StudentConfig.model_validate(INITS[init])
        for lr in lrs:
            for objective, terms in objectives.items():
                row, t0 = f"{init}@{lr:g}/{objective}", time.perf_counter()
                result = train_student(objective, terms, student, train_cfg.model_copy(update={"lr": lr}), storage, teacher, data, caches)
                folders[row], params[row] = result.model_folder, (result.init or {}).get("shape")
                print(f"{row}: {train_cfg.steps} steps in {time.perf_counter() - t0:.0f} s", flush=True)
    metrics = evaluate_students(teacher, folders, storage, data, cfg.eval, device, baseline=None)
    resample = {"resamples": cfg.eval.bootstrap_resamples, "seed": cfg.eval.bootstrap_seed}
    t = metrics["teacher"]
    print(f"\nHeld-out: {t['val_sequences']} validation sequences ({t['val_tokens']} tokens); teacher val ppl "
          f"{_ci(t, 'val_ppl', '{:.1f}')}. Students: {train_cfg.steps} steps × {train_cfg.batch_size} sequences of "
          f"{data.seq_len}, warm-up {train_cfg.warmup_steps} + cosine, top-k k={cfg.topk.k}.")
    print("| init | lr | objective | parameters | val ppl [95% CI] | × teacher | shape (layers; MLP; KV groups; hidden) |")
    print("|---|---|---|---|---|---|---|")
    for row, m in ((r, metrics[r]) for r in folders):
        init, rest = row.split("@")
        lr, objective = rest.split("/")
        shape = params[row]
        shape = f"{len(shape['layers'])}; {shape['intermediate_size']}; {shape['num_key_value_heads']}; {shape['hidden_size']}" if shape else "-"
        print(f"| {init} | {lr} | {objective} | {m['params'] / 1e6:.2f}M | {_ci(m, 'val_ppl', '{:.1f}')} | "
              f"{m['val_ppl'] / t['val_ppl']:.2f} | {shape} |")
    first = next(iter(objectives))
    best = {init: min((f"{init}@{lr:g}/{first}" for lr in lrs), key=lambda r: metrics[r]["val_ppl"]) for init in names}
    if "every_k" in best:
        print(f"\nEach init at its best learning rate ({first}) against every_k at its best ({best['every_k']}): paired ratio of val ppl.")
        print("| init | best lr | val ppl | ppl / every_k [95% CI] |")
        print("|---|---|---|---|")
        for init, row in best.items():
            cmp = paired(metrics[row], metrics[best["every_k"]], **resample).ratio
            print(f"| {init} | {row.split('@')[1].split('/')[0]} | {metrics[row]['val_ppl']:.1f} | "
                  f"{cmp.estimate:.3f} [{cmp.low:.3f}, {cmp.high:.3f}] |")
    if "ce_only" in objectives and len(objectives) > 1:
        print("\nKD against CE-only at the same init and learning rate: paired ratio of val ppl, and share of the "
              "CE-only-to-teacher gap closed (log space).")
        print("| init | lr | objective | val ppl | CE-only val ppl | ppl / CE-only [95% CI] | gap closed [95% CI] |")
        print("|---|---|---|---|---|---|---|")
        for row in folders:
            init, rest = row.split("@")
            lr, objective = rest.split("/")
            if objective == "ce_only":
                continue
            base = metrics[f"{init}@{lr}/ce_only"]
            cmp = paired(metrics[row], base, **resample).ratio
            gap = gap_closed(*(np.asarray(x["per_sequence"]["nll"]) for x in (metrics[row], base, t)),
                             np.asarray(t["per_sequence"]["tokens"]), **resample)
            gap_text = f"{gap.estimate:.0%} [{gap.low:.0%}, {gap.high:.0%}]" if gap else "undefined"
            print(f"| {init} | {lr} | {objective} | {metrics[row]['val_ppl']:.1f} | {base['val_ppl']:.1f} | "
                  f"{cmp.estimate:.3f} [{cmp.low:.3f}, {cmp.high:.3f}] | {gap_text} |")


def strategy_grid(args, cfg, train_cfg, storage, teacher, data, load, device) -> None:
    """Soft-KD on a top-k cache of each strategy, against CE-only (same init, steps and learning rate)."""
    names = list(TOPK_STRATEGIES) if args.strategies == "all" else args.strategies.split(",")
    folders = {"ce_only": train_student("ce_only", OBJECTIVES["ce_only"], cfg.student, train_cfg, storage, teacher, data).model_folder}
    sizes = {}
    for name in names:
        topk = cfg.topk.model_copy(update=TOPK_STRATEGIES[name])
        cache = run_all(topk_job(topk, teacher.to_dict(), data), load, data, storage)
        store = cache.open(storage)
        sizes[name] = store.num_bytes / (data.train_rows * (data.seq_len - 1))
        t0 = time.perf_counter()
        folders[name] = train_student(f"soft_kd_{name}", OBJECTIVES["soft_kd"], cfg.student, train_cfg, storage, teacher, data,
                                      {"topk": cache}).model_folder
        print(f"{name}: {train_cfg.steps} steps in {time.perf_counter() - t0:.0f} s", flush=True)
    metrics = evaluate_students(teacher, folders, storage, data, cfg.eval, device, baseline="ce_only")
    print(f"\nHeld-out: {metrics['teacher']['val_sequences']} validation sequences; soft-KD = 0.5·forward_kl + 0.5·ce, "
          f"{train_cfg.steps} steps × {train_cfg.batch_size} sequences of {data.seq_len}.")
    print("| top-k cache | settings | bytes / token | val ppl [95% CI] | ppl / CE-only [95% CI] | KL(teacher‖model) | ECE |")
    print("|---|---|---|---|---|---|---|")
    for name, m in ((n, metrics[n]) for n in ["teacher", "ce_only", *names]):
        settings = TOPK_STRATEGIES.get(name, {})
        size = f"{sizes[name]:.1f}" if name in sizes else "-"
        kl = f"{m['kl_to_teacher']:.3f}" if "kl_to_teacher" in m else "-"
        print(f"| {name} | {settings or '-'} | {size} | {_ci(m, 'val_ppl', '{:.1f}')} | {_ci(m, 'ppl_ratio_vs_baseline', '{:.3f}')} | "
              f"{kl} | {_ci(m, 'ece', '{:.4f}')} |")
    if "topk" in names:
        for name in (n for n in names if n != "topk"):
            r = paired(metrics[name], metrics["topk"], resamples=cfg.eval.bootstrap_resamples, seed=cfg.eval.bootstrap_seed).ratio
            print(f"ppl {name} / topk (paired): {r.estimate:.3f} [{r.low:.3f}, {r.high:.3f}]")


def float16_codec_grid(args, cfg, train_cfg, storage, teacher, data, caches, load, device) -> None:
    """Soft KD (same init, steps, learning rate) on the top-k cache in the compact codec vs the same
    top-k stored as before codecs (uint16/uint32 ids, float16 log-probabilities, float32 tail), which
    the reader still serves: paired perplexity ratio and bytes per kept logit of each."""
    from distill_core.cache.ref import teacher_cache_ref
    from distill_core.cache.shards import list_array
    from distill_core.cache.stage import ShardJob
    from distill_core.data import id_type
    from distill_core.losses.divergence import topk_targets_from_logits

    k, tau = cfg.topk.k, cfg.topk.temperature
    ids_type = id_type(teacher.vocab_size)

    def compute(model, seq_ids, input_ids, _sha):
        parts = []
        for start in range(0, len(input_ids), cfg.topk.batch_size):
            with torch.inference_mode():
                logits = model(input_ids=torch.from_numpy(input_ids[start : start + cfg.topk.batch_size])).logits[:, :-1]
                parts.append(topk_targets_from_logits(logits, k, tau))
        n = len(seq_ids)
        ids, lps = (torch.cat([getattr(t, a) for t in parts]) for a in ("ids", "logprobs"))
        tail = torch.cat([t.tail_logprob for t in parts])
        return pa.table({"seq_id": pa.array(seq_ids, pa.int64()),
                         "ids": list_array(ids.reshape(n, -1).numpy().astype(ids_type.to_pandas_dtype()), ids_type),
                         "logprobs": list_array(lps.reshape(n, -1).numpy().astype(np.float16), pa.float16()),
                         "tail_logprob": list_array(tail.numpy(), pa.float32())})

    old = run_all(ShardJob(ref=teacher_cache_ref("topk", {"k": k, "temperature": tau}, teacher.to_dict(), data), rows=None,
                           compute=compute), load, data, storage)
    folders = {"ce_only": train_student("ce_only", OBJECTIVES["ce_only"], cfg.student, train_cfg, storage, teacher, data).model_folder}
    for name, cache in (("soft_kd", caches["topk"]), ("soft_kd_float16", old)):
        folders[name] = train_student(name, OBJECTIVES["soft_kd"], cfg.student, train_cfg, storage, teacher, data, {"topk": cache}).model_folder
    metrics = evaluate_students(teacher, folders, storage, data, cfg.eval, device, baseline="ce_only")
    kept = data.train_rows * (data.seq_len - 1) * k
    print(f"\nHeld-out: {metrics['teacher']['val_sequences']} validation sequences; soft KD = 0.5·forward_kl + 0.5·ce, "
          f"{train_cfg.steps} steps × {train_cfg.batch_size} sequences, top-k k={k}.")
    print("| model | top-k codec | bytes / kept logit | val ppl [95% CI] | ppl / CE-only [95% CI] |")
    print("|---|---|---|---|---|")
    sizes = {"soft_kd": caches["topk"].open(storage).num_bytes / kept, "soft_kd_float16": old.open(storage).num_bytes / kept}
    for name in ("teacher", *folders):
        m = metrics[name]
        codec_name = {"soft_kd": caches["topk"].meta.get("codec", "-"), "soft_kd_float16": "float16 (before codecs)"}.get(name, "-")
        size = f"{sizes[name]:.2f}" if name in sizes else "-"
        print(f"| {name} | {codec_name} | {size} | {_ci(m, 'val_ppl', '{:.1f}')} | {_ci(m, 'ppl_ratio_vs_baseline', '{:.3f}')} |")
    r = paired(metrics["soft_kd"], metrics["soft_kd_float16"], resamples=cfg.eval.bootstrap_resamples, seed=cfg.eval.bootstrap_seed).ratio
    print(f"ppl compact codec / float16 codec (paired): {r.estimate:.4f} [{r.low:.4f}, {r.high:.4f}]")


# Cross-tokenizer rows (a student with its own tokenizer): GOLD's hybrid is exact-match KL + ULD.
CROSS_TOKENIZER = {
    "ce_only": OBJECTIVES["ce_only"],
    "seqkd": OBJECTIVES["seqkd"],
    "soft_kd": [T(name="forward_kl", weight=0.25), T(name="uld", weight=0.25), T(name="ce", weight=0.5)],
    "seqkd_soft": OBJECTIVES["seqkd_soft"],  # the samples' stored top-k carried across tokenizers
}


def train_split_tokenizer(storage, data, teacher, vocab_size: int, folder: str) -> str:
    """A byte-level BPE of ``vocab_size`` tokens trained on the train split's text (decoded from the
    teacher's tokens), saved under ``folder`` of the storage root; returns its local path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from distill_core.data import first_train_sequences

    local = storage.local_path(folder)
    if (local / "tokenizer.json").exists():
        return str(local)
    teacher_tokenizer = load_tokenizer(teacher, storage)
    texts = teacher_tokenizer.batch_decode(first_train_sequences(storage, data, data.train_rows), skip_special_tokens=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainer=trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                               show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>").save_pretrained(local)
    return str(local)


def cross_tokenizer_grid(args, cfg, train_cfg, storage, teacher, data, caches, device) -> None:
    """The teacher into students with their own tokenizer (a byte-level BPE trained on the train split):
    CE-only vs SeqKD vs cross-tokenizer soft KD (same init, steps and learning rate), scored in bits per
    byte of the same validation text (the teacher included), with paired 95% intervals."""
    folder = train_split_tokenizer(storage, data, teacher, args.cross_tokenizer, f"benchmarks/tokenizers/bpe-{args.cross_tokenizer}")
    student_cfg = cfg.student.model_copy(update={"tokenizer": folder})
    rows = [name for name in CROSS_TOKENIZER if name in args.only.split(",")]
    folders = {}
    for name, terms in ((n, CROSS_TOKENIZER[n]) for n in rows):
        t0 = time.perf_counter()
        folders[name] = train_student(name, terms, student_cfg, train_cfg, storage, teacher, data,
                                      {k: v for k, v in caches.items() if k in ("topk", "samples")}).model_folder
        print(f"{name}: {train_cfg.steps} steps in {time.perf_counter() - t0:.0f} s", flush=True)
    metrics = evaluate_students(teacher, folders, storage, data, cfg.eval, device, baseline="ce_only")
    print(f"\nHeld-out: {metrics['teacher']['val_sequences']} validation sequences, scored per byte of their text; students "
          f"with a {args.cross_tokenizer}-token byte-level BPE trained on the train split, {train_cfg.steps} steps × "
          f"{train_cfg.batch_size} sequences (+ one samples micro-batch per step for seqkd).")
    print("| model | loss parts | params | val bits/byte [95% CI] | per-byte ppl / CE-only [95% CI] |")
    print("|---|---|---|---|---|")
    for name in ["teacher", *rows]:
        m = metrics[name]
        terms = " + ".join(f"{t.weight}·{t.name}" for t in CROSS_TOKENIZER.get(name, []))
        print(f"| {name} | {terms or '-'} | {m['params'] / 1e6:.1f}M | {_ci(m, 'val_bpb', '{:.3f}')} | "
              f"{_ci(m, 'ppl_ratio_vs_baseline', '{:.3f}')} |")
    for name in (n for n in rows if n not in ("ce_only", "seqkd") and "seqkd" in rows):
        r = paired(metrics[name], metrics["seqkd"], resamples=cfg.eval.bootstrap_resamples, seed=cfg.eval.bootstrap_seed).ratio
        print(f"per-byte ppl {name} / seqkd (paired): {r.estimate:.3f} [{r.low:.3f}, {r.high:.3f}]")


# On-policy rows: the student's own samples graded by the teacher (reverse KL, as MiniLLM / GKD), in rounds.
ON_POLICY = {
    "soft_kd": (OBJECTIVES["soft_kd"], 0.0),
    "on_policy": ([T(name="reverse_kl", on="student_samples", weight=0.5), T(name="ce", weight=0.5)], 0.5),
    "mix": ([T(name="reverse_kl", on="student_samples", weight=0.5), T(name="forward_kl", weight=0.5), T(name="ce", weight=0.5)], 0.5),
}


def on_policy_grid(args, cfg, train_cfg, storage, teacher, data, caches, load, device) -> None:
    """Off-policy soft KD vs on-policy rounds vs their mix vs CE-only (same init, steps and learning
    rate): validation perplexity and the teacher's NLL of each student's own samples on held-out prompts,
    with paired 95% bootstrap intervals (over validation sequences, and over prompts)."""
    from distill_core.config import StudentSamplesConfig
    from distill_core.evaluate import evaluate, held_out_prompts, load_model
    from distill_core.generation_metrics import teacher_nll_per_prompt
    from distill_core.intervals import bootstrap_indices, percentile_interval
    from distill_core.rounds import rounds_folder, sample_round, start_rounds, train_round
    from distill_core.teacher import grade
    from distill_core.teacher.load import load_teacher as load_with_tokenizer
    from distill_core.teacher.sample import sample

    rounds = args.on_policy
    samples_cfg = StudentSamplesConfig(prompt_len=32, num_prompts=args.round_prompts, max_new_tokens=32, batch_size=16)
    folders = {"ce_only": train_student("ce_only", OBJECTIVES["ce_only"], cfg.student, train_cfg, storage, teacher, data).model_folder}
    seq_tokens = data.train_rows * data.seq_len
    teacher_tokens = {"ce_only": 0}
    for name, (terms, fraction) in ON_POLICY.items():
        t0 = time.perf_counter()
        if fraction == 0.0:
            folders[name] = train_student(name, terms, cfg.student, train_cfg, storage, teacher, data, caches).model_folder
            teacher_tokens[name] = seq_tokens
        else:
            rcfg = type(train_cfg).model_validate({**train_cfg.model_dump(), "losses": terms, "rounds": rounds, "round_steps": None,
                                                   "on_policy_fraction": fraction})
            out, used = rounds_folder(name, terms, cfg.student, rcfg, samples_cfg, cfg.topk, teacher, data, caches, None)
            start_rounds(out, cfg.student, rcfg, storage, teacher, data, None)
            graded_tokens = 0
            for r in range(1, rounds + 1):
                graded = sample_round(r, out, samples_cfg, cfg.topk, teacher.to_dict(), data, storage, load)
                record = train_round(r, name, terms, out, rcfg, storage, teacher, data, used, graded)
                graded_tokens += grade.teacher_nll(storage, graded)["tokens"] + samples_cfg.num_prompts * samples_cfg.prompt_len
                print(f"{name} round {r}: {record['metrics']}", flush=True)
            folders[name] = f"{out}/model"
            teacher_tokens[name] = graded_tokens + (seq_tokens if any(t.source == "data" and t.name != "ce" for t in terms) else 0)
        print(f"{name}: {train_cfg.steps} steps in {time.perf_counter() - t0:.0f} s", flush=True)

    teacher_model, tokenizer = load_with_tokenizer(teacher, storage, device=device)
    models = {n: load_model(storage, f).to(device) for n, f in folders.items()}
    metrics = evaluate(teacher_model, models, storage, data, cfg.eval, device, baseline="ce_only")
    prompts = held_out_prompts(storage, data, args.eval_prompts or 64, samples_cfg.prompt_len)
    scored = {}
    for name, model in {"teacher": teacher_model, **models}.items():
        done = sample(model, prompts, num_samples=1, max_new_tokens=samples_cfg.max_new_tokens, eos_token_id=teacher.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, seed=1, batch_size=16)
        scored[name] = teacher_nll_per_prompt(teacher_model, prompts, [d.completion_ids for d in done], tokenizer.pad_token_id)
    idx = bootstrap_indices(len(prompts), resamples=cfg.eval.bootstrap_resamples, seed=cfg.eval.bootstrap_seed)

    def nll_of(name, rows=slice(None)):
        nll, tokens = scored[name]
        return nll[rows].sum(-1) / np.maximum(tokens[rows].sum(-1), 1)

    def versus(a, b):
        return percentile_interval(float(nll_of(a) - nll_of(b)), nll_of(a, idx) - nll_of(b, idx))

    print(f"\nHeld-out: {metrics['teacher']['val_sequences']} validation sequences; {len(prompts)} held-out prompts of "
          f"{samples_cfg.prompt_len} tokens, {samples_cfg.max_new_tokens} new tokens sampled at T=1 (seed 1) by each model and "
          f"scored by the teacher. Students: {train_cfg.steps} steps × {train_cfg.batch_size} sequences; on-policy rows in "
          f"{rounds} rounds, {samples_cfg.num_prompts} prompts continued a round, half the steps on them.")
    print("| model | loss parts | teacher forward tokens | val ppl [95% CI] | ppl / CE-only [95% CI] | teacher NLL of own samples | "
          "Δ NLL vs soft_kd [95% CI] | Δ NLL vs CE-only [95% CI] |")
    print("|---|---|---|---|---|---|---|---|")
    for name in ["teacher", "ce_only", *ON_POLICY]:
        m = metrics[name]
        terms = " + ".join(f"{t.weight}·{t.name}{'@' + t.on if t.on != 'data' else ''}" for t in ON_POLICY.get(name, ([],))[0])
        cells = [f"{teacher_tokens[name]:,}" if name in teacher_tokens else "-", _ci(m, "val_ppl", "{:.1f}"),
                 _ci(m, "ppl_ratio_vs_baseline", "{:.3f}"), f"{float(nll_of(name)):.3f}"]
        for other in ("soft_kd", "ce_only"):
            d = versus(name, other) if name not in (other, "teacher") else None
            cells.append(f"{d.estimate:+.3f} [{d.low:+.3f}, {d.high:+.3f}]" if d else "-")
        print(f"| {name} | {terms or ('ce' if name == 'ce_only' else '-')} | " + " | ".join(cells) + " |")


def _ci(m: dict, key: str, fmt: str) -> str:
    """"estimate [low, high]" of ``key`` in one model's metrics, or "-" where it has none."""
    if m.get(key) is None:
        return "-"
    return f"{fmt.format(m[key])} [{fmt.format(m[key + '_low'])}, {fmt.format(m[key + '_high'])}]"


if __name__ == "__main__":
    main()
