"""The train_student stage without Prefect, for data-parallel training under ``torchrun``.

    torchrun --nproc-per-node 8 -m distill_core.train_cli CONFIG --run-id ID   # one node, 8 GPUs
    python -m distill_core.train_cli CONFIG --run-id ID                        # one process

Reads the teacher, prepare_data and cache_* outputs from the run record (``runs/<ID>/stages/``),
trains the student (and the CE-only baseline when ``train.baseline``) exactly as the
``train_student`` flow does, and rank 0 records the ``train_student`` stage, so
``distillery stage evaluate CONFIG --run-id ID`` goes on from there. Students live in
content-addressed folders, so the Prefect flow rerun on the same run finds them finished.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict

from distill_core import distributed
from distill_core.cache.ref import CacheRef
from distill_core.config import RunConfig, caches_for, load_config
from distill_core.data import DataRef
from distill_core.errors import DistilleryError
from distill_core.run_record import RunRecord
from distill_core.storage import Storage
from distill_core.teacher.load import TeacherRef
from distill_core.train import resolve_device, train_student


def train_run(config: RunConfig, run_id: str) -> dict:
    """Train the run's students on this process's share; returns what the stage records."""
    storage = Storage(config.storage.root, config.storage.options)
    record = RunRecord(storage, run_id)
    teacher = TeacherRef.from_dict(record.read_stage("teacher"))
    data = DataRef.from_dict(record.read_stage("prepare_data"))
    caches = {kind: CacheRef.from_dict(c) for kind, c in record.read_caches(config.train).items()}
    world = distributed.init(resolve_device(config.train.device))
    results = {}
    for name, terms in config.train.students().items():
        progress = _printer(name, config.train.steps) if world.is_main else None
        used = {kind: caches[kind] for kind in caches_for(terms)}
        result = train_student(name, terms, config.student, config.train, storage, teacher, data, caches=used,
                               progress=progress)
        results[name] = asdict(result) | {"history": result.history[-1:]}  # as the Prefect task returns it
    if world.is_main:
        record.write_stage("train_student", results)
    world.barrier()
    return results


def _printer(name: str, total: int):
    every = max(1, total // 10)

    def progress(step: int, steps: int, record: dict) -> None:
        if step % every == 0 or step == steps:
            values = " ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "step")
            print(f"{name} step {step}/{steps} {values}", file=sys.stderr, flush=True)

    return progress


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distill_core.train_cli", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML run config (the one the run was started with)")
    parser.add_argument("--run-id", required=True, help="run whose teacher, data and cache stages have finished")
    args = parser.parse_args(argv)
    try:
        results = train_run(load_config(args.config), args.run_id)
    except DistilleryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown()
    if os.environ.get("RANK", "0") == "0":
        for name, result in results.items():
            print(f"{name}: {result['model_folder']} final loss {result['final_loss']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
