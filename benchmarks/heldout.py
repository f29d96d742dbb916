"""A finished run's teacher, student and CE-only baseline on text the project never trains on.

    python benchmarks/heldout.py --run-id ID [--config deployments/demo.yaml] [--root DIR] [--sequences N]

The embedded corpus is Python's pydoc topics (the language reference). This scores the models on
the docstrings of standard-library modules instead (none of them is a pydoc topic), packed into
sequences of the run's ``data.seq_len``: perplexity with 95% bootstrap intervals over the sequences,
and the paired ratio of student to baseline perplexity, so a KD gain that is specific to the
training corpus would show as an interval that reaches 1.
"""

from __future__ import annotations

import argparse
import importlib

import numpy as np
import torch

from distill_core.config import load_config
from distill_core.evaluate import compare, load_model, paired
from distill_core.intervals import perplexity_interval
from distill_core.run_record import RunRecord
from distill_core.storage import Storage
from distill_core.teacher.load import TeacherRef, load_teacher

MODULES = [
    "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "concurrent.futures", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "fnmatch",
    "fractions", "functools", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html", "http", "inspect",
    "ipaddress", "itertools", "json", "locale", "logging", "lzma", "mailbox", "mimetypes", "numbers", "operator",
    "optparse", "os", "pathlib", "pickle", "pkgutil", "platform", "pprint", "queue", "random", "re", "sched",
    "secrets", "selectors", "shelve", "shlex", "shutil", "signal", "smtplib", "socket", "sqlite3", "statistics",
    "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace",
    "traceback", "typing", "unittest", "urllib.parse", "uuid", "warnings", "weakref", "xml.dom", "zipfile", "zoneinfo",
]


def held_out_text() -> list[str]:
    """Docstrings of the modules above and of their public classes and functions, in a fixed order."""
    docs = []
    for name in MODULES:
        module = importlib.import_module(name)
        parts = [module.__doc__ or ""]
        for attr in sorted(getattr(module, "__all__", None) or dir(module)):
            obj = getattr(module, attr, None)
            if not attr.startswith("_") and getattr(obj, "__module__", None) == name and getattr(obj, "__doc__", None):
                parts.append(f"{attr}: {obj.__doc__}")
        docs.append("\n\n".join(p.strip() for p in parts if p and p.strip()))
    return [d for d in docs if d]


def pack(tokenizer, docs: list[str], seq_len: int, count: int) -> torch.Tensor:
    """Documents joined by EOS and cut into ``count`` sequences of ``seq_len`` tokens: int64 [count, T]."""
    ids: list[int] = []
    for doc in docs:
        ids += tokenizer(doc)["input_ids"] + [tokenizer.eos_token_id]
    if len(ids) < count * seq_len:
        raise SystemExit(f"only {len(ids)} held-out tokens: ask for at most {len(ids) // seq_len} sequences")
    return torch.tensor(ids[: count * seq_len]).view(count, seq_len)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="deployments/demo.yaml")
    parser.add_argument("--root", default=None, help="storage root (default: the config's)")
    parser.add_argument("--run-id", required=True, help="a finished run (its train_student stage is read)")
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    cfg = load_config(args.config)
    storage = Storage(args.root or cfg.storage.root, cfg.storage.options)
    record = RunRecord(storage, args.run_id)
    teacher_ref = TeacherRef.from_dict(record.read_stage("teacher"))
    seq_len = record.read_stage("prepare_data")["seq_len"]
    students = {name: load_model(storage, r["model_folder"]) for name, r in record.read_stage("train_student").items()}
    teacher, tokenizer = load_teacher(teacher_ref, storage)
    ids = pack(tokenizer, held_out_text(), seq_len, args.sequences)
    batches = ((np.arange(s, s + len(ids[s : s + args.batch_size])), ids[s : s + args.batch_size])
               for s in range(0, len(ids), args.batch_size))
    metrics = compare(teacher, students, batches, torch.device("cpu"))
    print(f"Held-out text: standard-library docstrings, {args.sequences} sequences × {seq_len} tokens.")
    print("| model | ppl [95% CI] |")
    print("|---|---|")
    for name, m in metrics.items():
        ci = perplexity_interval(np.asarray(m["per_sequence"]["nll"]), np.asarray(m["per_sequence"]["tokens"]))
        print(f"| {name} | {ci.estimate:.1f} [{ci.low:.1f}, {ci.high:.1f}] |")
    if "baseline" in metrics:
        for name in (n for n in students if n != "baseline"):
            r = paired(metrics[name], metrics["baseline"]).ratio
            print(f"\n{name} / baseline perplexity: {r.estimate:.3f} [{r.low:.3f}, {r.high:.3f}] (paired, 95%)")


if __name__ == "__main__":
    main()
