"""Held-out quality of students trained with equal steps by each objective, on the embedded setup.

    python benchmarks/quality.py [--config deployments/demo.yaml] [--steps N] [--root DIR]

Prints validation perplexity (and agreement with the teacher) for the teacher, a CE-only student
and the soft-KD student. Every stage is content-addressed under the storage root, so a rerun reuses
the teacher conversion, data, caches and finished students.
"""

from __future__ import annotations

import argparse
import time

from distill_core.config import LossTerm, load_config
from distill_core.data import prepare_data
from distill_core.evaluate import evaluate_students
from distill_core.storage import Storage
from distill_core.teacher.load import load_teacher, load_tokenizer, resolve_teacher
from distill_core.teacher.topk import cache_topk
from distill_core.train import resolve_device, train_student


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="deployments/demo.yaml")
    parser.add_argument("--steps", type=int, default=None, help="student steps (default: the config's)")
    parser.add_argument("--root", default=None, help="storage root (default: the config's)")
    args = parser.parse_args()
    cfg = load_config(args.config)
    train_cfg = cfg.train.model_copy(update={"steps": args.steps}) if args.steps else cfg.train
    storage = Storage(args.root or cfg.storage.root, cfg.storage.options)
    device = resolve_device(train_cfg.device)

    t0 = time.perf_counter()
    teacher = resolve_teacher(cfg.teacher, storage)
    data = prepare_data(cfg.data, load_tokenizer(teacher, storage), teacher.tokenizer_hash, storage)
    cache = cache_topk(lambda: load_teacher(teacher, storage, device=device)[0], data, teacher.to_dict(), cfg.topk, storage)
    print(f"teacher, data and top-k cache ready in {time.perf_counter() - t0:.0f} s")

    objectives = {"ce_only": [LossTerm(name="ce")], "soft_kd": list(cfg.train.losses)}
    folders = {}
    for name, terms in objectives.items():
        t0 = time.perf_counter()
        result = train_student(name, terms, cfg.student, train_cfg, storage, teacher, data, {"topk": cache})
        folders[name] = result.model_folder
        print(f"{name}: {train_cfg.steps} steps in {time.perf_counter() - t0:.0f} s")
    metrics = evaluate_students(teacher, folders, storage, data, cfg.eval, device)

    terms = " + ".join(f"{t.weight}·{t.name}" for t in cfg.train.losses)
    print(f"\nHeld-out ({data.validation_rows} validation sequences of {data.seq_len}; scored {metrics['teacher']['val_tokens']} tokens), "
          f"{train_cfg.steps} steps × {train_cfg.batch_size} × {data.seq_len} tokens; soft_kd = {terms}, k={cfg.topk.k}")
    print(f"| model | val ppl | ppl / CE-only | top-1 agreement | KL(teacher‖model) |")
    print("|---|---|---|---|---|")
    base = metrics["ce_only"]["val_ppl"]
    for name in ["teacher", *objectives]:
        m = metrics[name]
        agree = f"{m['top1_agreement']:.3f}" if "top1_agreement" in m else "-"
        kl = f"{m['kl_to_teacher']:.3f}" if "kl_to_teacher" in m else "-"
        print(f"| {name} | {m['val_ppl']:.1f} | {m['val_ppl'] / base:.3f} | {agree} | {kl} |")


if __name__ == "__main__":
    main()
