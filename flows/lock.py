"""One flow at a time per run id: the nightly flow and every stage flow hold ``runs/<run_id>/.lock``.

``@holds_run_lock`` goes under ``@flow``: it takes the lock before the flow body runs and releases
it when the body returns or raises, so a second run on the same run id fails at once with a
message naming the lock file (see :class:`distill_core.run_record.RunLock`). Stage flows called
by the nightly flow run inside its lock: a lock this context already holds is not taken again.
"""

from __future__ import annotations

import functools
import inspect
from contextvars import ContextVar
from typing import Any, Callable

from prefect.runtime import flow_run

from distill_core.config import RunConfig
from distill_core.run_record import RunLock
from tasks.common import storage_of

_HELD: ContextVar[frozenset[str]] = ContextVar("distillery_held_run_locks", default=frozenset())


def holds_run_lock(fn: Callable | None = None, *, resolve_run_id: Callable[[RunConfig, Any], str] | None = None):
    """Decorate a flow function taking ``config`` and ``run_id``.

    ``resolve_run_id(config, run_id)`` turns a missing run id into the one the body will use (the
    nightly flow derives it from the flow run); the body then receives that id."""

    def decorate(fn: Callable) -> Callable:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            config = bound.arguments["config"]
            if resolve_run_id is not None:
                bound.arguments["run_id"] = resolve_run_id(config, bound.arguments["run_id"])
            lock = RunLock(storage_of(config.storage), bound.arguments["run_id"], owner=_owner())
            held = _held()
            if lock.url in held:
                return fn(*bound.args, **bound.kwargs)
            with lock:
                token = _hold(held | {lock.url})
                try:
                    return fn(*bound.args, **bound.kwargs)
                finally:
                    _unhold(token)

        return wrapper

    return decorate(fn) if fn is not None else decorate


# The wrapper reaches the ContextVar only through these functions: Dask and Ray pickle the flow (by
# value, with the globals its code names) into every task's context, and a ContextVar does not pickle.
def _held() -> frozenset[str]:
    return _HELD.get()


def _hold(held: frozenset[str]):
    return _HELD.set(held)


def _unhold(token) -> None:
    _HELD.reset(token)


def _owner() -> dict[str, str]:
    if flow_run.id is None:
        return {}
    return {"flow_run_id": str(flow_run.id), "flow_run_name": str(flow_run.name or "")}
