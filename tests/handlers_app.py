"""Handlers that the inbox tests load into worker subprocesses (``--include``).

Topics come from the environment so that each test has its own. Every effect
is a row in ``effects`` of the test's database, written in the handler's
transaction.
"""

import os
import time

from outbox_bridge import outbox_handler, publish

TOPIC = os.environ.get("TEST_TOPIC", "tests-inbox")
CHAINED = os.environ.get("TEST_CHAINED_TOPIC", "tests-chained")
_failed_here: set = set()

SCHEMA = """
CREATE TABLE IF NOT EXISTS effects (
    handler text, message_id uuid, k text, seq int, at timestamptz DEFAULT now());
CREATE TABLE IF NOT EXISTS switches (name text PRIMARY KEY, on_ boolean);
CREATE TABLE IF NOT EXISTS started (message_id uuid);
"""


def _effect(tx, handler, message):
    value = message.value if isinstance(message.value, dict) else {}
    tx.execute(
        "INSERT INTO effects (handler, message_id, k, seq) VALUES (%s, %s, %s, %s)",
        (handler, message.message_id, value.get("k"), value.get("seq")),
    )


@outbox_handler(TOPIC, max_retries=5, retry_backoff=True, retry_backoff_max=2)
def record(message, tx):
    """Records every message; fails the first time a process sees a "fail" message."""
    value = message.value
    if value.get("fail") and message.message_id not in _failed_here:
        _failed_here.add(message.message_id)
        raise RuntimeError(f"injected failure of {value}")
    if value.get("sleep"):
        # tell the test we are inside the handler, outside our own transaction
        import psycopg2

        side = psycopg2.connect(os.environ["OUTBOX_BRIDGE_DATABASE_URL"])
        with side, side.cursor() as cur:
            cur.execute("INSERT INTO started VALUES (%s)", (message.message_id,))
        side.close()
        time.sleep(value["sleep"])
    _effect(tx, "record", message)
    if value.get("chain"):
        publish(tx, CHAINED, {"from": str(message.message_id)}, key=message.key)


@outbox_handler(TOPIC, name="outbox.tests.switchable", max_retries=2, retry_backoff_max=1)
def switchable(message, tx):
    """Fails while the switch 'broken' is on."""
    tx.execute("SELECT on_ FROM switches WHERE name = 'broken'")
    row = tx.fetchone()
    if row and row[0]:
        raise RuntimeError("the switch 'broken' is on")
    _effect(tx, "switchable", message)
