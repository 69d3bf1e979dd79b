"""The Celery app that ``celery -A outbox_bridge worker`` runs.

Settings come from the top-level ``celeryconfig`` module when there is one
(the current directory is searched, as Celery does), on top of the safe
defaults below.
"""

from __future__ import annotations

import os

from celery import Celery, signals
from click import Option

from ..config import DEFAULT_BROKER_URL, get_settings, use_conf
from ..events import emit

app = Celery("outbox_bridge")

# Lower priority than celeryconfig: a user's config can change any of these.
app.add_defaults(
    {
        "broker_url": DEFAULT_BROKER_URL,
        # JSON only: Celery messages carry row ids, never pickled objects.
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_ignore_result": True,
        # Flower sees every task.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        # A message is acked after its task ran; a killed worker's task comes back.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "broker_transport_options": {"confirm_publish": True},
        "broker_connection_retry_on_startup": True,
    }
)
app.config_from_object("celeryconfig", silent=True)
app.conf.imports = tuple(app.conf.imports or ()) + ("outbox_bridge.outbox.tasks",)
use_conf(app.conf)

# The worker's steps are named, not imported (Celery loads them when a worker starts):
# the tasks that use this app stay free of the loops that send them work.
STEPS = ("SchemaCheckStep", "OutboxWatcherStep", "InboxConsumerStep", "RetentionStep", "EventsStep")
for step in STEPS:
    app.steps["worker"].add(f"outbox_bridge.worker.bootsteps:{step}")
for flag, what in (
    ("--without-outbox-watcher", "the dispatcher (claims shards, sends their tasks)"),
    ("--without-inbox-consumer", "the Kafka inbox consumer"),
    ("--without-retention", "the pruning of handled inbox messages and old bookkeeping"),
):
    app.user_options["worker"].add(
        Option([flag], is_flag=True, default=False, help=f"Do not run {what} in this worker.")
    )


@signals.worker_init.connect(weak=False)
def _before_pool(**_) -> None:
    emit("worker_starting", get_settings())


@signals.worker_process_shutdown.connect(weak=False)
def _process_exits(**_) -> None:
    emit("process_exited", os.getpid())
