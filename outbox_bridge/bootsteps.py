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
        from .loops import LoopThread
        from .watcher import Watcher

        settings = get_settings()
        if not settings.watcher:
            log.info("outbox watcher off (outbox_bridge_watcher)")
            return
        watcher = Watcher(worker.app, settings, worker.concurrency or 4)
        self.thread = LoopThread(watcher.run, "outbox-bridge-watcher")
        self.thread.start()

    def stop(self, worker) -> None:
        if self.thread is not None:
            self.thread.stop()
            self.thread = None


class InboxConsumerStep(bootsteps.StartStopStep):
    """Runs the Kafka inbox consumer in a thread of the worker's main process."""

    requires = {"celery.worker.components:Pool"}

    def __init__(self, worker, without_inbox_consumer: bool = False, **kwargs):
        super().__init__(worker, **kwargs)
        self.enabled = not without_inbox_consumer
        self.thread = None

    def start(self, worker) -> None:
        from .config import get_settings
        from .handlers import handler_topics
        from .inbox import InboxConsumer
        from .loops import LoopThread

        settings = get_settings()
        topics = handler_topics()
        if not settings.consumer or not topics:
            log.info("inbox consumer off (outbox_bridge_consumer, or no @outbox_handler)")
            return
        self.thread = LoopThread(InboxConsumer(settings, topics).run, "outbox-bridge-inbox")
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
    app.user_options["worker"].add(
        Option(
            ["--without-inbox-consumer"],
            is_flag=True,
            default=False,
            help="Do not run the Kafka inbox consumer in this worker.",
        )
    )
    app.steps["worker"].add(OutboxWatcherStep)
    app.steps["worker"].add(InboxConsumerStep)
