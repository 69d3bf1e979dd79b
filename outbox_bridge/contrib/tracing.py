"""OpenTelemetry trace context from ``publish()`` to the handler (``opentelemetry-api``
only: the SDK and the exporter are the application's choice).

- ``publish()`` stores the current context (``traceparent``, ``tracestate``,
  whatever the global propagator writes) in the message's headers, unless the
  caller set those headers; it travels to Kafka with them.
- The relay's produce is a ``send <topic>`` span (kind PRODUCER), one per
  topic and batch, linked to the context of each message it sends.
- A handler runs in a ``process <topic>`` span (kind CONSUMER) whose parent
  is the publisher's context: one trace from the request that wrote the order
  to the handler that shipped it.

Names and attributes follow the OpenTelemetry messaging semantic conventions.
Without ``opentelemetry-api``, or without an SDK configured, all of this costs
next to nothing: no span records, no header is written.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

try:
    from opentelemetry import propagate, trace
    from opentelemetry.trace import SpanKind
except ImportError:  # pragma: no cover - the API is an optional extra
    trace = None

SYSTEM = "kafka"


def _tracer():
    from .. import __version__

    return trace.get_tracer("outbox_bridge", __version__)


def recording() -> bool:
    """Whether the application configured a tracer provider (an SDK): without one,
    the spans would record nothing, so the relay and the handlers skip them."""
    if trace is None:
        return False
    provider = trace.get_tracer_provider()
    return not isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider))


def inject(headers: list[list[Any]]) -> list[list[Any]]:
    """``headers`` (as stored) plus the current trace context, when there is one."""
    if trace is None or not trace.get_current_span().get_span_context().is_valid:
        return headers
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    names = {h[0] for h in headers}
    return headers + [[k, v] for k, v in carrier.items() if k not in names]


def _extract(pairs: Any) -> Any:
    """The context in (name, value) header pairs (values as str or bytes), or None."""
    carrier = {}
    for name, value in pairs or ():
        if name in ("traceparent", "tracestate", "baggage"):
            if isinstance(value, (bytes, bytearray)):
                value = bytes(value).decode("latin-1")
            if isinstance(value, str):
                carrier[name] = value
    return propagate.extract(carrier) if "traceparent" in carrier else None


@contextmanager
def sending(rows: Sequence[Any]) -> Iterator[None]:
    """Around producing ``rows`` and waiting for their acknowledgements."""
    if trace is None or not rows or not recording():
        yield
        return
    tracer = _tracer()
    by_topic: dict[str, list[Any]] = {}
    for row in rows:
        by_topic.setdefault(row.topic, []).append(row)
    spans = []
    for topic, found in by_topic.items():
        span = tracer.start_span(
            f"send {topic}",
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": SYSTEM,
                "messaging.operation.name": "send",
                "messaging.operation.type": "send",
                "messaging.destination.name": topic,
                "messaging.batch.message_count": len(found),
            },
        )
        if span.is_recording():
            for row in found:
                ctx = _extract(row.headers)
                if ctx is not None:
                    linked = trace.get_current_span(ctx).get_span_context()
                    span.add_link(linked, {"messaging.message.id": row.message_id})
        spans.append(span)
    try:
        yield
    finally:
        for span in spans:
            span.end()


@contextmanager
def processing(message: Any, handler: str) -> Iterator[None]:
    """Around one handler call: a span whose parent is the publisher's context."""
    if trace is None or not recording():
        yield
        return
    attributes = {
        "messaging.system": SYSTEM,
        "messaging.operation.name": "process",
        "messaging.operation.type": "process",
        "messaging.destination.name": message.topic,
        "messaging.message.id": str(message.message_id),
        "outbox_bridge.handler": handler,
    }
    if message.partition is not None:
        attributes["messaging.destination.partition.id"] = str(message.partition)
    if message.offset is not None:
        attributes["messaging.kafka.offset"] = message.offset
    if message.key is not None:
        attributes["messaging.kafka.message.key"] = message.key.decode("utf-8", "replace")
    with _tracer().start_as_current_span(
        f"process {message.topic}",
        context=_extract(message.headers),
        kind=SpanKind.CONSUMER,
        attributes=attributes,
    ):
        yield


class Tracing:
    """The middleware (``outbox_bridge.events``) that carries the trace context:
    in the headers of ``publish()``, around the relay's sends and the handlers."""

    def active(self) -> bool:
        return recording()

    def publishing(self, headers: list[list[Any]]) -> list[list[Any]]:
        return inject(headers)

    def sending(self, rows: Sequence[Any]) -> Any:
        return sending(rows)

    def processing(self, message: Any, handler: str) -> Any:
        return processing(message, handler)
