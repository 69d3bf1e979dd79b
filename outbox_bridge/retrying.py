"""What the tasks of both sides share: a task's own retry schedule, and which
database errors are worth another attempt."""

from __future__ import annotations

import logging
import random
from typing import Any

import psycopg2
from celery.utils.time import get_exponential_backoff_interval

from .db import drop_task_connection, is_transient
from .errors import TransientError

log = logging.getLogger(__name__)


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


def again_later(task: Any, countdown: float, why: object) -> None:
    """Send ``task`` again with the same arguments and the same retry count: the
    work did not fail, its surroundings did (the database or a topic is away), so
    its own retry budget (``max_retries``) is not spent. If even that send fails,
    the lease brings the work back to the watcher."""
    try:
        task.apply_async(task.request.args, task.request.kwargs, countdown=countdown,
                         retries=task.request.retries)  # fmt: skip
        log.warning("%s: %s; again in %.1fs (not counted as a retry)", task.name, why, countdown)
    except Exception:  # noqa: BLE001
        log.exception("%s: could not send it again; the lease brings its work back", task.name)


def transient_countdown(pause_seconds: float) -> float:
    """How long to wait after a transient error: about a pause, spread out."""
    return pause_seconds * (1 + random.random())
