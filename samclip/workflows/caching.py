"""Prefect cache policy for the pipeline's steps: the task's inputs, within one root flow run.

Every compute step already skips work that storage holds, so a new flow run re-checks storage
instead of trusting Prefect's cache: its results (counts of what was computed, for one) are
then the new run's own. Within one flow run, including its retries, a completed step with the
same inputs returns its persisted result and is not run again.

Inputs are hashed from a canonical JSON form: pydantic models by their field values,
dataclasses field by field, and plain JSON values as they are. An input without such a form
(a lock, a file handle, an arbitrary object) makes the key None, so Prefect does not cache
that call at all, rather than risk returning one call's result for other inputs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from pydantic import BaseModel

logger = logging.getLogger(__name__)


class UnhashableInput(TypeError):
    """An input has no canonical JSON form, so no cache key can stand for it."""


def canonical(value: Any) -> Any:
    """Return a JSON-serialisable form of ``value`` that changes whenever the value does."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, BaseModel):
        return {"__type__": type(value).__qualname__, **value.model_dump(mode="json")}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: canonical(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {"__type__": type(value).__qualname__, **fields}
    if isinstance(value, dict):
        if not all(isinstance(key, str) for key in value):
            raise UnhashableInput(f"dict with non-string keys: {list(value)[:3]}")
        return {key: canonical(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [canonical(item) for item in value]
    raise UnhashableInput(f"{type(value).__qualname__} has no canonical form")


def input_digest(inputs: dict[str, Any]) -> str | None:
    """Return a sha256 of the inputs' canonical form, or None when one cannot be hashed."""
    try:
        text = json.dumps(canonical(inputs), sort_keys=True, allow_nan=True)
    except UnhashableInput as error:
        logger.info("not caching: %s", error)
        return None
    return hashlib.sha256(text.encode()).hexdigest()


def root_flow_run_id() -> str | None:
    """Return the id of the outermost flow run, which stays the same across its retries."""
    from prefect.runtime import flow_run

    try:
        return str(flow_run.get_root_flow_run_id() or "") or None
    except Exception as error:  # the runtime lookup calls the API; without it, do not cache
        logger.warning("not caching: the root flow run id is unavailable (%s)", error)
        return None


@dataclasses.dataclass
class StepInputs(CachePolicy):
    """Key a task on its name, its canonical inputs and the root flow run; None disables caching."""

    def compute_key(
        self,
        task_ctx: TaskRunContext,
        inputs: dict[str, Any],
        flow_parameters: dict[str, Any],
        **kwargs: Any,
    ) -> str | None:
        digest = input_digest(inputs or {})
        if digest is None:
            return None
        run_id = root_flow_run_id()
        if run_id is None:
            return None
        return f"{task_ctx.task.name}-{run_id}-{digest}"


STEP_CACHE = StepInputs()
