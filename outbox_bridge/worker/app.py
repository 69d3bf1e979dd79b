"""The Celery app that ``celery -A outbox_bridge worker`` runs.

Settings come from the top-level ``celeryconfig`` module when there is one
(the current directory is searched, as Celery does), on top of the safe
defaults below.
"""

from __future__ import annotations

from celery import Celery

from ..config import DEFAULT_BROKER_URL, use_conf

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

from . import bootsteps  # noqa: E402  (registers worker options and steps)

bootsteps.install(app)
