"""What publish() adds to a message's headers for tracing (no services needed; the
whole trace through the pipeline is tested in tests/acceptance/test_observability.py)."""

from opentelemetry.sdk.trace import TracerProvider

from outbox_bridge.contrib import tracing


def test_no_current_span_adds_no_header():
    assert tracing.inject([["h", "v"]]) == [["h", "v"]]


def test_the_current_context_is_added_and_a_callers_own_traceparent_kept():
    tracer = TracerProvider().get_tracer("tests")
    with tracer.start_as_current_span("request") as span:
        added = dict(tracing.inject([["h", "v"]]))
        own = tracing.inject([["traceparent", "00-" + "1" * 32 + "-" + "2" * 16 + "-01"]])
    trace_id = f"{span.get_span_context().trace_id:032x}"
    assert added["h"] == "v" and added["traceparent"].split("-")[1] == trace_id
    assert own == [["traceparent", "00-" + "1" * 32 + "-" + "2" * 16 + "-01"]]


def test_a_context_is_read_back_from_stored_or_kafka_headers():
    tracer = TracerProvider().get_tracer("tests")
    with tracer.start_as_current_span("request") as span:
        stored = tracing.inject([])
    kafka = [(name, value.encode()) for name, value in stored]
    for pairs in (stored, kafka):
        ctx = tracing._extract(pairs)
        found = tracing.trace.get_current_span(ctx).get_span_context()
        assert found.trace_id == span.get_span_context().trace_id
    assert tracing._extract([("h", b"v")]) is None
