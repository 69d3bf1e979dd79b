"""Fault injection for worker subprocesses (``OUTBOX_BRIDGE_BEFORE_PRODUCE``)."""

import json

_failed_here: set = set()


def fail_once_per_process(row) -> None:
    """Fail rows whose JSON value has ``"fail": true`` the first time this process sees them.

    With 4 worker processes a row fails at most 4 times, within max_retries=5.
    """
    if row.value and b'"fail":true' in row.value and row.message_id not in _failed_here:
        _failed_here.add(row.message_id)
        raise RuntimeError(f"injected failure of {json.loads(row.value)}")


_fatal_here: list = []


def fatal_once_per_process(row) -> None:
    """The producer boundary reports a fatal error once per process (as an idempotent
    producer does after, say, an out-of-sequence error): every row of that round fails."""
    from confluent_kafka import KafkaError, KafkaException

    if not _fatal_here and row.key is not None and b'"seq":3' in (row.value or b""):
        _fatal_here.append(row.message_id)
        raise KafkaException(KafkaError(KafkaError._FATAL, "injected fatal error", fatal=True))


def slow_produce(row) -> None:
    """Rows with ``"slow": true`` keep the batch's transaction open for 1 s."""
    import time

    if row.value and b'"slow":true' in row.value:
        time.sleep(1)


def fail_marked(row) -> None:
    """Rows whose JSON value has ``"fail_always": true`` always fail."""
    if row.value and b'"fail_always":true' in row.value:
        raise RuntimeError("injected failure: always")


def exit_marked(row) -> None:
    """Rows whose JSON value has ``"exit_always": true`` end their process, as an out-of-memory
    kill or a crash in a C extension would: no exception, no ``on_failure``."""
    import os

    if row.value and b'"exit_always":true' in row.value:
        os._exit(1)
