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
