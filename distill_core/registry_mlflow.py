"""The model registry on an MLflow tracking server (``registry.kind: mlflow``).

Same rule and shape as the file registry (:mod:`distill_core.registry`), stored where the rest of
an MLflow stack looks. One register is one MLflow run in the experiment ``experiment``:

- params: the resolved run config, flattened (``train.lr``, ``student.every_k``, ...);
- metrics: the numeric metrics (``val_ppl``, ...);
- tags: the lineage (``lineage.teacher``, ``lineage.data_fingerprint``, ...);
- artifacts: ``distillery/entry.json`` (metrics, lineage, config, primary metric: the file registry's
  entry) and the student in MLflow's ``transformers`` flavour (safetensors weights, config,
  generation config and tokenizer under ``model/``), registered as the next version of ``name``
  with the model card as its description and ``README.md``.

The ``champion`` alias (an MLflow model version alias) moves to the new version only when its
primary metric is strictly better than the champion's (read from the champion's run), or when
there is no champion. Load a version with
``mlflow.transformers.load_model("models:/<name>@champion", return_type="components")``.

The server numbers versions atomically; the alias move is read, compare, write, so two registers
of one model finishing in the same instant may both move it (the later write wins).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from distill_core.errors import RegistryError
from distill_core.registry import (
    CHAMPION,
    SCHEMA_VERSION,
    RegisteredVersion,
    _beats,
    _is_number,
    _plain,
    check_registration,
    model_card,
)
from distill_core.version import CODE_VERSION

DEFAULT_EXPERIMENT = "distillery"
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
MAX_TAG_CHARS = 8000  # and on a tag value


def register(
    tracking_uri: str | None,
    name: str,
    model,
    tokenizer,
    *,
    metrics: dict[str, Any],
    lineage: dict[str, Any],
    config: dict[str, Any],
    primary_metric: str = "val_ppl",
    lower_is_better: bool = True,
    experiment: str = DEFAULT_EXPERIMENT,
) -> RegisteredVersion:
    """Log ``model`` and ``tokenizer`` as the next version of ``name``; move ``champion`` if it wins.

    ``tracking_uri`` None means ``$MLFLOW_TRACKING_URI``. ``url`` of the result is ``models:/<name>/<version>``.
    """
    value = check_registration(name, metrics, primary_metric)
    lineage = {"code_version": CODE_VERSION, **lineage}
    import mlflow
    from huggingface_hub import ModelCard

    uri = _tracking_uri(tracking_uri)
    client = mlflow.MlflowClient(uri)
    # Decide the champion before the upload so an unreachable server fails before the expensive part.
    previous, previous_value = _champion(client, name, primary_metric)
    wins = previous is None or _beats(value, previous_value, lower_is_better)
    entry = {
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "metrics": metrics,
        "primary_metric": primary_metric,
        "lower_is_better": lower_is_better,
        "lineage": lineage,
        "config": config,
    }
    with _tracking(mlflow, uri):
        experiment_id = mlflow.set_experiment(experiment).experiment_id
        with mlflow.start_run(experiment_id=experiment_id, run_name=f"register-{name}"):
            mlflow.log_params(_flat_params(config))
            mlflow.log_metrics({k: float(v) for k, v in metrics.items() if _is_number(v)})
            mlflow.set_tags({**_lineage_tags(lineage), "distillery.primary_metric": primary_metric,
                             "distillery.lower_is_better": str(lower_is_better).lower()})
            mlflow.log_dict(_plain(entry), "distillery/entry.json")
            info = mlflow.transformers.log_model(
                {"model": model, "tokenizer": tokenizer},
                name="model",
                task="text-generation",
                registered_model_name=name,
                # A card of our own keeps MLflow from looking one up on the Hugging Face hub; the
                # version's full card (with its number) follows as README.md and the description.
                model_card=ModelCard(f"---\nlibrary_name: transformers\ntags: [distillation, distillery]\n---\n\n# {name}\n"),
                # Explicit requirements: inferring them reloads the model in a subprocess.
                pip_requirements=_requirements(),
            )
    version = int(info.registered_model_version)
    url = f"models:/{name}/{version}"
    card = model_card(name, version, url, metrics, lineage, config, primary_metric)
    card = card.replace(
        f'path = "{url}"\nmodel = AutoModelForCausalLM.from_pretrained(path)\ntokenizer = AutoTokenizer.from_pretrained(path)',
        f'import mlflow\n\nparts = mlflow.transformers.load_model("{url}", return_type="components")\n'
        'model, tokenizer = parts["model"], parts["tokenizer"]',
    ).replace("from transformers import AutoModelForCausalLM, AutoTokenizer\n\n", "")
    with tempfile.TemporaryDirectory(prefix="distillery-card-") as tmp:
        readme = Path(tmp) / "README.md"
        readme.write_text(card, encoding="utf-8")
        client.log_model_artifact(info.model_id, str(readme))
    client.update_model_version(name, str(version), description=card)
    for key, tag in _lineage_tags(lineage).items():
        client.set_model_version_tag(name, str(version), key, tag)
    client.set_model_version_tag(name, str(version), f"metric.{primary_metric}", repr(float(value)))
    if wins:
        client.set_registered_model_alias(name, CHAMPION, str(version))
    return RegisteredVersion(name, version, url, wins, previous)


def find_by_lineage(tracking_uri: str | None, name: str, key: str, value: Any) -> RegisteredVersion | None:
    """The version whose lineage ``key`` equals ``value`` (a rerun's earlier register), else None."""
    import mlflow

    client = mlflow.MlflowClient(_tracking_uri(tracking_uri))
    wanted = _tag_value(value)
    if "'" in wanted:
        raise RegistryError(f"lineage value {wanted!r} has a quote, which MLflow's search cannot match.")
    found = client.search_model_versions(f"name = '{name}' and tags.`lineage.{key}` = '{wanted}'")
    if not found:
        return None
    version = min(int(v.version) for v in found)
    champion, _ = _champion(client, name, None)
    return RegisteredVersion(name, version, f"models:/{name}/{version}", champion == version, None)


def champion_version(tracking_uri: str | None, name: str) -> int | None:
    """The version the ``champion`` alias points at, or None."""
    import mlflow

    return _champion(mlflow.MlflowClient(_tracking_uri(tracking_uri)), name, None)[0]


# -- internals ----------------------------------------------------------------------------------
def _tracking_uri(tracking_uri: str | None) -> str:
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise RegistryError(
            "registry.kind is 'mlflow' but no tracking server is named: set registry.tracking_uri "
            "(e.g. http://mlflow:5000) or MLFLOW_TRACKING_URI."
        )
    return uri


class _tracking:
    """MLflow's fluent API reads a process-wide tracking URI: point it at ``uri`` for a block only."""

    def __init__(self, mlflow, uri: str):
        self.mlflow, self.uri = mlflow, uri

    def __enter__(self):
        self.before = self.mlflow.get_tracking_uri() if self.mlflow.is_tracking_uri_set() else None
        self.mlflow.set_tracking_uri(self.uri)

    def __exit__(self, *exc):
        self.mlflow.set_tracking_uri(self.before)


def _champion(client, name: str, primary_metric: str | None) -> tuple[int | None, Any]:
    """(champion version, its run's value of ``primary_metric``), or (None, None) without one."""
    from mlflow.exceptions import MlflowException

    try:
        found = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None, None  # no such model yet, or no champion alias
        raise
    if primary_metric is None:
        return int(found.version), None
    metric = client.get_run(found.run_id).data.metrics.get(primary_metric) if found.run_id else None
    return int(found.version), metric


def _flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in _plain(config).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flat_params(value, f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
            out[name] = text[:MAX_PARAM_CHARS]
    return out


def _tag_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(_plain(value), sort_keys=True)
    return text[:MAX_TAG_CHARS]


def _lineage_tags(lineage: dict[str, Any]) -> dict[str, str]:
    return {f"lineage.{k}": _tag_value(v) for k, v in lineage.items() if v is not None}


def _requirements() -> list[str]:
    import torch
    import transformers

    return [f"torch=={torch.__version__.split('+')[0]}", f"transformers=={transformers.__version__}", "safetensors"]
