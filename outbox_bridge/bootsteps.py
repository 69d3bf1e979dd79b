"""Worker bootsteps: the long-lived loops that ``celery -A outbox_bridge worker`` runs."""

from __future__ import annotations

import logging

from celery import Celery, bootsteps
from click import Option

log = logging.getLogger(__name__)


class OutboxWatcherStep(bootsteps.StartStopStep):
    """Runs the outbox LISTEN watcher in a thread of the worker's main process."""

    requires = {"celery.worker.components:Pool"}

    def __init__(self, worker, without_outbox_watcher: bool = False, **kwargs):
        super().__init__(worker, **kwargs)
        self.enabled = not without_outbox_watcher
        self.thread = None

    def start(self, worker) -> None:
        from .config import get_settings
        from .watcher import WatcherThread

        settings = get_settings()
        if not settings.watcher:
            log.info("outbox watcher off (outbox_bridge_watcher)")
            return
        self.thread = WatcherThread(worker.app, settings)
        self.thread.start()

    def stop(self, worker) -> None:
        if self.thread is not None:
            self.thread.stop()
            self.thread = None


def install(app: Celery) -> None:
    """Add outbox-bridge's worker options and steps to ``app``."""
    app.user_options["worker"].add(
        Option(
            ["--without-outbox-watcher"],
            is_flag=True,
            default=False,
            help="Do not run the outbox LISTEN watcher in this worker.",
        )
    )
    app.steps["worker"].add(OutboxWatcherStep)
