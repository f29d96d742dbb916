"""Held-out quality of students trained with equal steps by each objective, on the embedded setup.

    python benchmarks/quality.py [--config deployments/demo.yaml] [--steps N] [--root DIR] [--only a,b]
                                 [--validation-sequences N] [--eval-prompts N]

Rows: the teacher; a CE-only student; soft-KD (top-k forward KL + CE); SeqKD (CE on teacher
samples + CE); SeqKD + soft targets on the samples; beam_top1 (+ CE); beam_top1 + beam_rank (+ CE).
Every student has the same init, steps, batch size and learning rate; terms on teacher samples or
beams add one micro-batch from that cache per step. Columns: validation perplexity, agreement and
KL with the teacher, the teacher's NLL of each model's samples on held-out prompts, and how often a
student's top-scored beam candidate is the teacher's best. Every stage is content-addressed under
the storage root, so a rerun reuses the teacher, data, caches and finished students.
"""

from __future__ import annotations

import argparse
import time

import torch

from distill_core.cache.stage import run_all
from distill_core.config import LossTerm, load_config
from distill_core.data import prepare_data
from distill_core.evaluate import evaluate_students
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="deployments/demo.yaml")
    parser.add_argument("--steps", type=int, default=None, help="student steps (default: the config's)")
    parser.add_argument("--root", default=None, help="storage root (default: the config's)")
    parser.add_argument("--only", default=",".join(OBJECTIVES), help="comma-separated objectives to train")
    parser.add_argument("--validation-sequences", type=int, default=None,
                        help="held-out sequences scored, and the pool of held-out prompts (default: the config's)")
    parser.add_argument("--eval-prompts", type=int, default=None, help="held-out prompts for sample/beam metrics (default: the config's)")
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
    sources = {t.source for terms in objectives.values() for t in terms}
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


def _ci(m: dict, key: str, fmt: str) -> str:
    """"estimate [low, high]" of ``key`` in one model's metrics, or "-" where it has none."""
    if m.get(key) is None:
        return "-"
    return f"{fmt.format(m[key])} [{fmt.format(m[key + '_low'])}, {fmt.format(m[key + '_high'])}]"


if __name__ == "__main__":
    main()
