"""Worker bootsteps: the long-lived loops that ``celery -A outbox_bridge worker`` runs.

Each runs in a thread of the worker's main process, after the pool has forked,
and can be switched off by a worker flag or a setting.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from celery import bootsteps

log = logging.getLogger(__name__)


class SchemaCheckStep(bootsteps.StartStopStep):
    """Refuses to start the worker against a schema older than this version needs
    (its tasks and loops would fail on every message instead). A database that
    does not answer now is no reason to refuse: the loops wait for it."""

    requires = {"celery.worker.components:Pool"}

    def start(self, worker) -> None:
        import psycopg2

        from ..config import get_settings
        from ..errors import SchemaTooOld
        from ..migrate import pending

        try:
            missing = pending(get_settings())
        except psycopg2.OperationalError as exc:
            log.warning("could not check the outbox-bridge schema now: %s", exc)
            return
        if missing:
            raise SchemaTooOld(
                f"the database lacks outbox-bridge migrations {', '.join(missing)}: run"
                " `outbox-bridge migrate` (or apply `outbox-bridge migrate --sql`) first"
            )


class _LoopStep(bootsteps.StartStopStep):
    requires = {"celery.worker.components:Pool", SchemaCheckStep}
    flag = ""  # the worker option that switches the loop off

    def __init__(self, worker, **kwargs):
        self.enabled = not kwargs.pop(self.flag, False)
        super().__init__(worker, **kwargs)
        self.thread = None

    def loop(self, worker) -> tuple[Callable, str] | None:
        """(run(stop), thread name), or None when the loop is off."""
        raise NotImplementedError

    def start(self, worker) -> None:
        from ..loops import LoopThread

        found = self.loop(worker)
        if found is not None:
            self.thread = LoopThread(*found)
            self.thread.start()

    def stop(self, worker) -> None:
        if self.thread is not None:
            self.thread.stop()
            self.thread = None


class OutboxWatcherStep(_LoopStep):
    """Runs the dispatcher: stands for election (one per database dispatches), then
    claims ready shards of every queue and sends their tasks. Off (flag or setting),
    the worker still joins the fleet: its pool counts in every queue's share."""

    flag = "without_outbox_watcher"

    def __init__(self, worker, **kwargs):
        super().__init__(worker, **kwargs)
        self.member_only = not self.enabled
        self.enabled = True  # a member of the fleet either way

    def loop(self, worker):
        from ..config import get_settings
        from .dispatcher import Dispatcher
        from .election import serve_member

        settings = get_settings()
        concurrency = worker.concurrency or 4
        if self.member_only or not settings.watcher:
            log.info("outbox watcher off: this worker only adds its pool to the fleet")
            return serve_member(settings, concurrency), "outbox-bridge-fleet"
        watcher = Dispatcher(worker.app, settings, concurrency)
        return watcher.run, "outbox-bridge-watcher"


class InboxConsumerStep(_LoopStep):
    """Runs the Kafka inbox consumer for the topics of the registered handlers."""

    flag = "without_inbox_consumer"

    def loop(self, worker):
        from ..config import get_settings
        from ..inbox.consumer import InboxConsumer
        from ..inbox.handlers import handler_rows

        settings = get_settings()
        rows = handler_rows()
        if not settings.consumer or not rows:
            log.info("inbox consumer off (outbox_bridge_consumer, or no @outbox_handler)")
            return None
        return InboxConsumer(settings, rows).run, "outbox-bridge-inbox"


class RetentionStep(_LoopStep):
    """Forgets handled inbox messages after the dedupe window (see ``retention``)."""

    flag = "without_retention"

    def loop(self, worker):
        from ..config import get_settings
        from .maintenance import Retention

        if get_settings().dedupe_window <= 0:
            log.info("inbox messages kept for ever (outbox_bridge_dedupe_window = 0)")
        return Retention(get_settings()).run, "outbox-bridge-retention"


class EventsStep(bootsteps.StartStopStep):
    """Tells the middleware (``outbox_bridge.events``) that the worker runs and stops:
    the metrics middleware serves ``outbox_bridge_metrics_port`` meanwhile."""

    requires = {"celery.worker.components:Pool", SchemaCheckStep}

    def start(self, worker) -> None:
        from ..config import get_settings
        from ..events import emit

        emit("worker_started", get_settings())

    def stop(self, worker) -> None:
        from ..events import emit

        emit("worker_stopping")
