"""Loaded into worker subprocesses by the observability tests (``--include``).

``record_dead`` is a dead-message hook (``OUTBOX_BRIDGE_DEAD_HOOK``); with
``TEST_DEAD_SIGNAL`` set, a ``message_dead`` receiver records too. With
``TEST_TRACE_FILE`` set, the worker runs the OpenTelemetry SDK and writes
every finished span to that file, one JSON object per line.
"""

import json
import os
from pathlib import Path

import psycopg2

from outbox_bridge.signals import message_dead

DEAD_TABLE = """
CREATE TABLE IF NOT EXISTS dead_seen (
    queue text, id bigint, message_id uuid, topic text, key text, attempts int,
    last_error text, via text, pid int)
"""


def _record(message, via: str) -> None:
    conn = psycopg2.connect(os.environ["OUTBOX_BRIDGE_DATABASE_URL"])
    try:
        with conn, conn.cursor() as cur:
            cur.execute(
                "INSERT INTO dead_seen VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    message.queue,
                    message.id,
                    message.message_id,
                    message.topic,
                    message.key.decode() if message.key else None,
                    message.attempts,
                    message.last_error,
                    via,
                    os.getpid(),
                ),
            )
    finally:
        conn.close()


def finished_spans(path) -> list[dict]:
    """The spans a worker with ``TEST_TRACE_FILE=path`` has finished so far."""
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def record_dead(message) -> None:
    _record(message, "hook")


if os.environ.get("TEST_DEAD_SIGNAL"):

    @message_dead.connect(weak=False)
    def _on_dead(sender, message, **_):
        _record(message, "signal")


if os.environ.get("TEST_TRACE_FILE"):
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

    class FileExporter(SpanExporter):
        def __init__(self, path: str):
            self.path = path

        def export(self, spans):
            with open(self.path, "a") as f:  # one write per span: processes append safely
                for span in spans:
                    f.write(json.dumps(json.loads(span.to_json()), separators=(",", ":")) + "\n")
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(FileExporter(os.environ["TEST_TRACE_FILE"])))
    trace.set_tracer_provider(provider)
