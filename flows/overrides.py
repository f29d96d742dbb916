"""A partial ``config`` given to a deployment run overrides the deployment's config field by field.

Prefect replaces a deployment's parameter with the run's value as a whole, so
``prefect deployment run nightly-distillation/nightly --param config='{"train": {"steps": 6}}'`` would
otherwise run on the defaults of every other field, not on the deployment's values.
``@merges_deployment_config`` goes under ``@flow`` (above ``@holds_run_lock``, which reads the storage
root from the config): in a run of a deployment, the fields the run's config sets are laid over the
deployment's own config, and the result is validated again. Outside a deployment it changes nothing.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

from distill_core.config import RunConfig, parse_config


def merge_onto(base: Any, override: Any) -> Any:
    """``override`` laid over ``base``: mappings merge key by key, anything else (lists, scalars) replaces.

    A mapping whose ``kind`` differs from the base's (teacher, runner, registry) replaces it whole,
    since its fields belong to the other kind."""
    if not (isinstance(base, dict) and isinstance(override, dict)) or override.get("kind", base.get("kind")) != base.get("kind"):
        return override
    return {**base, **{k: merge_onto(base[k], v) if k in base else v for k, v in override.items()}}


def with_deployment_config(config: RunConfig, deployment_config: dict | None) -> RunConfig:
    """``config``'s explicitly set fields over ``deployment_config`` (a raw run config), validated; raises ConfigError."""
    if not deployment_config:
        return config
    merged = merge_onto(deployment_config, config.model_dump(mode="json", exclude_unset=True))
    return parse_config(merged, "the run's config laid over the deployment's")


def _deployment_config() -> dict | None:
    """The ``config`` parameter of the deployment this flow run belongs to, or None outside a deployment."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import deployment

    if deployment.id is None:
        return None
    with get_client(sync_client=True) as client:
        return (client.read_deployment(deployment.id).parameters or {}).get("config")


def merges_deployment_config(fn: Callable) -> Callable:
    """Decorate a flow function taking ``config``: see the module docstring."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        bound.arguments["config"] = with_deployment_config(bound.arguments["config"], _deployment_config())
        return fn(*bound.args, **bound.kwargs)

    return wrapper
