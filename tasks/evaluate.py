"""Evaluation task: held-out metrics of teacher and students, as JSON and a table artifact."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_table_artifact

from distill_core.config import BeamsConfig, EvalConfig, StorageConfig
from distill_core.data import DataRef
from distill_core.evaluate import evaluate_students
from distill_core.teacher.load import TeacherRef
from distill_core.train import resolve_device
from tasks.common import CONTENT, artifact_key, storage_of, transient


@task(name="evaluate", cache_policy=CONTENT, persist_result=True, retries=1, retry_condition_fn=transient)
def evaluate(
    teacher: dict, students: dict[str, str], data: dict, cfg: EvalConfig, storage: StorageConfig, model_name: str,
    generation: bool = False, selection: bool = False, beams: BeamsConfig | None = None,
) -> dict:
    """{model name: metrics}; ``students`` maps names to model folders under the storage root.

    Each model's metrics keep its per-sequence NLL ("per_sequence"), so later comparisons need no
    rescoring; the table artifact shows the scalar metrics and their intervals.

    ``generation`` / ``selection`` add the sample and beam-ranking metrics (see evaluate_students)."""
    metrics = evaluate_students(TeacherRef.from_dict(teacher), students, storage_of(storage), DataRef.from_dict(data),
                                cfg, resolve_device("auto"), generation=generation, selection=selection, beams=beams)
    rows = [
        {"model": name, **{k: round(v, 4) if isinstance(v, float) else v for k, v in m.items() if not isinstance(v, (list, dict))}}
        for name, m in metrics.items()
    ]
    create_table_artifact(rows, key=artifact_key("metrics", model_name), description="teacher vs students")
    return metrics
