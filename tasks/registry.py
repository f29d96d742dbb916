"""Registry task: save the trained student with its metrics and lineage as a new immutable version."""

from __future__ import annotations

from dataclasses import asdict

from prefect import task
from prefect.runtime import flow_run

from distill_core import registry, registry_mlflow
from distill_core.config import RunConfig
from distill_core.evaluate import load_model
from distill_core.version import CODE_VERSION
from tasks.common import storage_of, transient


@task(name="register", retries=1, retry_condition_fn=transient)
def register_student(config: RunConfig, run_id: str, teacher: dict, data: dict, caches: dict[str, dict],
                     student: dict, metrics: dict, rounds: list[dict] | None = None) -> dict:
    """Register ``student`` (a train result) unless this very model is registered already. ``rounds``:
    the on-policy rounds' records; the lineage keeps each round's student and graded-samples cache."""
    from transformers import AutoTokenizer

    storage = storage_of(config.storage)
    name = config.registry.name
    # Both backends take (where, name, ...): the storage root, or the MLflow tracking URI.
    if config.registry.kind == "mlflow":
        backend, where, extra = registry_mlflow, config.registry.tracking_uri, {"experiment": config.registry.experiment}
    else:
        backend, where, extra = registry, storage, {"link_from": f"{student['model_folder']}"}
    existing = backend.find_by_lineage(where, name, "student_folder", student["model_folder"])
    if existing is not None:
        return asdict(existing)
    lineage = {
        "teacher": teacher["source"],
        "teacher_fingerprint": teacher["fingerprint"],
        "data_fingerprint": data["fingerprint"],
        "caches": [c["folder"] for c in caches.values()],
        "student_folder": student["model_folder"],
        "run_id": run_id,
        "flow_run_id": str(flow_run.id or ""),
        "code_version": CODE_VERSION,
    }
    if rounds:
        lineage["rounds"] = [{"round": r["round"], "student_folder": r["student_folder"], "student_fingerprint": r["student_fingerprint"],
                              "sampled_by": r["cache"]["meta"]["student_fingerprint"], "cache": r["cache"]["folder"]}
                             for r in rounds]
        lineage["caches"] += [r["cache"]["folder"] for r in rounds]
    if student.get("init"):  # pruned students: kept layers and widths, importance scores, search candidates
        lineage["init"] = student["init"]
    summary = {k: v for k, v in metrics["student"].items() if isinstance(v, (int, float))}
    summary["teacher_val_ppl"] = metrics["teacher"]["val_ppl"]
    if "baseline" in metrics:
        summary["baseline_val_ppl"] = metrics["baseline"]["val_ppl"]
    local = storage.local_dir(student["model_folder"])
    version = backend.register(
        where, name, load_model(storage, student["model_folder"]), AutoTokenizer.from_pretrained(local),
        metrics=summary, lineage=lineage, config=config.model_dump(mode="json"), **extra,
    )
    return asdict(version)
