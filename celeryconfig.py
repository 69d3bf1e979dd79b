"""Celery settings of the outbox-bridge worker (``celery -A outbox_bridge worker``).

outbox-bridge reads its own settings from here too (``outbox_bridge_*`` keys);
the environment variables in the README override the deploy knobs.
"""

import os

broker_url = os.environ.get("CELERY_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
# The queue of outbox-bridge's tasks (and of the worker, unless -Q says otherwise).
task_default_queue = os.environ.get("OUTBOX_BRIDGE_CELERY_QUEUE", "celery")

# JSON only: Celery messages carry row ids, never payloads or pickles.
task_serializer = "json"
result_serializer = "json"
event_serializer = "json"
accept_content = ["json"]
result_accept_content = ["json"]
task_ignore_result = True

# Flower: task events on by default.
worker_send_task_events = True
task_send_sent_event = True

# RabbitMQ publisher confirms, and acks only after a task ran.
broker_transport_options = {"confirm_publish": True}
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1

# Modules with @outbox_handler functions are listed here, as for any Celery task.
imports = []

# outbox-bridge settings (defaults shown; see the README's configuration reference).
outbox_bridge_max_retries = 5
outbox_bridge_retry_backoff = 1.0
outbox_bridge_batch_size = 2000
