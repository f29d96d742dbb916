"""Peak memory of prepare_data as the corpus grows: the embedded corpus repeated N times, as text files.

    python benchmarks/data_memory.py [--repeats 1,10] [--root DIR] [--seq-len 128]

For each N, a fresh process writes the embedded corpus N times into a local folder (one ``.txt``
file per document and copy, each copy headed by its number so that no two files are equal), loads
the embedded teacher's tokenizer, and runs ``prepare_data`` on the folder into a fresh storage
root. It reports the process's resident memory just before the call and the peak during it (the
peak is reset before the call through ``/proc/self/clear_refs``, so imports and the tokenizer do
not count). The teacher is converted to a Hugging Face folder once, in the parent process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure(repeats: int, root: Path, seq_len: int) -> dict:
    """One measurement, in this process: prepare_data on the embedded corpus × ``repeats``."""
    from distill_core.config import DataConfig, GGUFTeacher
    from distill_core.data import prepare_data
    from distill_core.documents import embedded_documents
    from distill_core.storage import Storage
    from distill_core.teacher.load import load_tokenizer, resolve_teacher

    teacher_storage = Storage(str(root / "teacher-root"))
    ref = resolve_teacher(GGUFTeacher(), teacher_storage)
    tokenizer = load_tokenizer(ref, teacher_storage)
    folder = root / f"corpus-x{repeats}"
    folder.mkdir(parents=True, exist_ok=True)
    chars = 0
    for copy in range(repeats):
        for i, doc in enumerate(embedded_documents()):
            text = f"copy {copy}\n{doc}"
            (folder / f"c{copy:03d}-d{i:03d}.txt").write_text(text)
            chars += len(text)
    cfg = DataConfig(source=str(folder), seq_len=seq_len)
    storage = Storage(str(root / f"root-x{repeats}-{time.time_ns()}"))
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    data = prepare_data(cfg, tokenizer, ref.tokenizer_hash, storage)
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    return {
        "repeats": repeats, "documents": repeats * len(embedded_documents()), "chars": chars,
        "rows": data.train_rows + data.validation_rows, "tokens": (data.train_rows + data.validation_rows) * seq_len,
        "rss_before_mib": before / 1024, "peak_mib": peak / 1024, "growth_mib": (peak - before) / 1024,
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", default="1,10", help="comma-separated corpus multiples")
    parser.add_argument("--root", default="/tmp/distillery-data-memory", help="scratch folder")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # a child's single measurement
    args = parser.parse_args()
    root = Path(args.root)
    if args.one is not None:
        print(json.dumps(measure(args.one, root, args.seq_len)))
        return
    from distill_core.config import GGUFTeacher
    from distill_core.storage import Storage
    from distill_core.teacher.load import resolve_teacher

    resolve_teacher(GGUFTeacher(), Storage(str(root / "teacher-root")))  # convert once, outside the measurements
    print("| corpus | documents | characters | packed tokens | RSS before | peak during | growth | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for repeats in (int(r) for r in args.repeats.split(",")):
        out = subprocess.run(
            [sys.executable, __file__, "--one", str(repeats), "--root", str(root), "--seq-len", str(args.seq_len)],
            check=True, capture_output=True, text=True,
        ).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"| embedded × {repeats} | {r['documents']:,} | {r['chars']:,} | {r['tokens']:,} | "
              f"{r['rss_before_mib']:.0f} MiB | {r['peak_mib']:.0f} MiB | {r['growth_mib']:.1f} MiB | {r['seconds']:.1f} |")


if __name__ == "__main__":
    main()
