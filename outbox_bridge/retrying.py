"""What the tasks of both sides share: a task's own retry schedule, and which
database errors are worth another attempt."""

from __future__ import annotations

from typing import Any

import psycopg2
from celery.utils.time import get_exponential_backoff_interval

from .db import drop_task_connection, is_transient
from .errors import TransientError


def backoff(task: Any, retries: int, jitter: bool | None = None) -> float:
    """The countdown Celery's autoretry waits before retry ``retries + 1`` of ``task``,
    from the task's own ``retry_backoff``, ``retry_backoff_max`` and ``retry_jitter``."""
    factor = float(getattr(task, "retry_backoff", False) or 0)
    if not factor:
        return float(task.default_retry_delay or 0)
    return get_exponential_backoff_interval(
        factor=int(max(1.0, factor)),
        retries=retries,
        maximum=int(getattr(task, "retry_backoff_max", 600)),
        full_jitter=getattr(task, "retry_jitter", True) if jitter is None else jitter,
    )


def lease_for(task: Any, retries: int, lease_seconds: float) -> float:
    """How long a retrying row stays owned by its retry task: the longest countdown
    before retry ``retries + 1`` plus a lease, so nobody re-drives it early."""
    return backoff(task, retries, jitter=False) + lease_seconds


def reraise_database_error(exc: BaseException) -> None:
    """After a database error in a task: drop this thread's connection and raise
    ``TransientError`` (which the tasks retry) when another attempt may succeed.
    Other errors are left to the caller."""
    if not isinstance(exc, psycopg2.Error):
        return
    drop_task_connection()
    if is_transient(exc):
        raise TransientError(f"{type(exc).__name__}: {str(exc).strip()}") from exc
