"""Handlers that the inbox tests load into worker subprocesses (``--include``).

Topics come from the environment so that each test has its own. Every effect
is a row in ``effects`` of the test's database, written in the handler's
transaction; ``at`` is the clock time of the write, so effects sort in the
order they were written, even within one batch.
"""

import os
import time
import uuid

import psycopg2

from outbox_bridge import outbox_handler, publish

TOPIC = os.environ.get("TEST_TOPIC", "tests-inbox")
CHAINED = os.environ.get("TEST_CHAINED_TOPIC", "tests-chained")
SLOW = os.environ.get("TEST_SLOW_TOPIC", "tests-slow")
WAITS = os.environ.get("TEST_WAIT_TOPIC")
_failed_here: set = set()

SCHEMA = """
CREATE TABLE IF NOT EXISTS effects (
    handler text, message_id uuid, k text, seq int, at timestamptz DEFAULT clock_timestamp());
CREATE TABLE IF NOT EXISTS switches (name text PRIMARY KEY, on_ boolean);
CREATE TABLE IF NOT EXISTS started (message_id uuid);
CREATE TABLE IF NOT EXISTS failures (
    message_id uuid PRIMARY KEY, at timestamptz DEFAULT clock_timestamp());
CREATE TABLE IF NOT EXISTS spans (
    message_id uuid, pid int, started timestamptz, ended timestamptz DEFAULT clock_timestamp());
CREATE TABLE IF NOT EXISTS calls (attempt int, at timestamptz DEFAULT clock_timestamp());
CREATE TABLE IF NOT EXISTS batch_calls (
    ids uuid[], at timestamptz DEFAULT clock_timestamp());
CREATE TABLE IF NOT EXISTS orm_effects (message_id uuid PRIMARY KEY, k text, seq int);
CREATE TABLE IF NOT EXISTS poison_calls (
    message_id uuid, attempts int, at timestamptz DEFAULT clock_timestamp());
-- a foreign key the way Django makes every one: checked at COMMIT
CREATE TABLE IF NOT EXISTS parents (id int PRIMARY KEY);
CREATE TABLE IF NOT EXISTS children (
    parent int REFERENCES parents (id) DEFERRABLE INITIALLY DEFERRED);
"""


def _side(sql, params=()):
    """Write outside the handler's transaction (it survives the handler's failure)."""
    side = psycopg2.connect(os.environ["OUTBOX_BRIDGE_DATABASE_URL"])
    try:
        with side, side.cursor() as cur:
            cur.execute(sql, params)
    finally:
        side.close()


def _attempts(tx, handler, message) -> int:
    tx.execute(
        "SELECT attempts FROM outbox_bridge.deliveries WHERE message_id = %s AND handler = %s",
        (message.message_id, handler),
    )
    return tx.fetchone()[0]


def _effect(tx, handler, message):
    value = message.value if isinstance(message.value, dict) else {}
    tx.execute(
        "INSERT INTO effects (handler, message_id, k, seq) VALUES (%s, %s, %s, %s)",
        (handler, message.message_id, value.get("k"), value.get("seq")),
    )


@outbox_handler(TOPIC, max_retries=5, retry_backoff=True, retry_backoff_max=2)
def record(message, tx):
    """Records every message. ``fail``: fails the first time a process sees it;
    ``fail_first``: fails the delivery's first attempt (noted in ``failures``)."""
    value = message.value
    if value.get("cloudevent"):  # what the handler sees of a CloudEvent: its type as k
        event = message.cloudevent or {}
        tx.execute(
            "INSERT INTO effects (handler, message_id, k, seq) VALUES ('record', %s, %s, %s)",
            (message.message_id, event.get("type"), value.get("seq")),
        )
        return
    if value.get("poison"):
        raise RuntimeError("poison: fails every time")
    if value.get("fail") and message.message_id not in _failed_here:
        _failed_here.add(message.message_id)
        raise RuntimeError(f"injected failure of {value}")
    if value.get("fail_first") and _attempts(tx, record.name, message) == 0:
        _side(
            "INSERT INTO failures (message_id) VALUES (%s)"
            " ON CONFLICT (message_id) DO UPDATE SET at = clock_timestamp()",
            (message.message_id,),
        )
        raise RuntimeError(f"injected first-attempt failure of {value}")
    if value.get("hang_once"):  # the first call hangs (past any time limit)
        tx.execute("SELECT count(*) FROM started WHERE message_id = %s", (message.message_id,))
        if tx.fetchone()[0] == 0:
            _side("INSERT INTO started VALUES (%s)", (message.message_id,))
            time.sleep(value["hang_once"])
    if value.get("sleep"):
        # tell the test we are inside the handler, outside our own transaction
        _side("INSERT INTO started VALUES (%s)", (message.message_id,))
        time.sleep(value["sleep"])
    _effect(tx, "record", message)
    if value.get("sleep_after"):  # our write is made, our transaction still open
        time.sleep(value["sleep_after"])
    if value.get("chain"):
        publish(tx, CHAINED, {"from": str(message.message_id)}, key=message.key)
    if value.get("chain_then_fail"):  # publishes, and raises on its first attempt
        publish(tx, CHAINED, {"from": str(message.message_id)}, key=message.key)
        if _attempts(tx, record.name, message) == 0:
            _side(
                "INSERT INTO failures (message_id) VALUES (%s) ON CONFLICT DO NOTHING",
                (message.message_id,),
            )
            raise RuntimeError("fails after its publish(): that message must go too")


@outbox_handler(TOPIC, name="outbox.tests.switchable", max_retries=2, retry_backoff_max=1)
def switchable(message, tx):
    """Fails while the switch 'broken' is on."""
    tx.execute("SELECT on_ FROM switches WHERE name = 'broken'")
    row = tx.fetchone()
    if row and row[0]:
        raise RuntimeError("the switch 'broken' is on")
    _effect(tx, "switchable", message)


@outbox_handler(
    SLOW,
    name="outbox.tests.slow",
    retry_backoff=3,
    retry_jitter=False,
    max_retries=3,
    retry_backoff_max=600,
)
def slow(message, tx):
    """Always fails; notes the attempt and the time of each call."""
    _side("INSERT INTO calls (attempt) VALUES (%s)", (_attempts(tx, slow.name, message),))
    raise RuntimeError("always fails")


if WAITS:  # only the fleet tests subscribe to it: a third topic changes others' assignments

    @outbox_handler(WAITS, name="outbox.tests.waits")
    def waits(message, tx):
        """Waits 0.3 s in the database (I/O, not CPU), noting when it ran and where."""
        tx.execute("SELECT clock_timestamp(), pg_sleep(0.3)")
        (started, _) = tx.fetchone()
        tx.execute(
            "INSERT INTO spans (message_id, pid, started) VALUES (%s, %s, %s)",
            (message.message_id, os.getpid(), started),
        )


if os.environ.get("TEST_CRASH_BEFORE_OFFSET_COMMIT"):
    # the worker dies between the inbox's database commit and its Kafka offset commit
    import signal

    import outbox_bridge.inbox.consumer

    def _crash(consumer, messages):
        _side("INSERT INTO started (message_id) VALUES (NULL)")  # the crash happened here
        os.kill(os.getpid(), signal.SIGKILL)

    outbox_bridge.inbox.consumer.commit_offsets = _crash


if os.environ.get("TEST_EXTRA_HANDLER"):
    # a handler only some workers have (a rolling deploy that adds it), on its own queue

    @outbox_handler(TOPIC, name="outbox.tests.extra", queue=os.environ["TEST_EXTRA_QUEUE"])
    def extra(message, tx):
        _effect(tx, "extra", message)


if os.environ.get("TEST_ORM_TOPIC"):
    # a handler written with the service's SQLAlchemy models: tx is a Session
    from sqlalchemy import Integer, String, Uuid, text
    from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

    class Base(DeclarativeBase):
        pass

    class OrmEffect(Base):
        __tablename__ = "orm_effects"
        message_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
        k: Mapped[str] = mapped_column(String)
        seq: Mapped[int] = mapped_column(Integer)

    @outbox_handler(
        os.environ["TEST_ORM_TOPIC"],
        name="outbox.tests.orm",
        session=sessionmaker(),
        max_retries=3,
        retry_backoff_max=1,
    )
    def orm(message, session):
        """Adds an OrmEffect; ``fail_first`` fails the first attempt after its write;
        ``chain`` publishes through the session."""
        value = message.value
        session.add(OrmEffect(message_id=message.message_id, k=value["k"], seq=value["seq"]))
        session.flush()
        attempts = session.execute(
            text(
                "SELECT attempts FROM outbox_bridge.deliveries"
                " WHERE message_id = :m AND handler = 'outbox.tests.orm'"
            ),
            {"m": message.message_id},
        ).scalar_one()
        if value.get("fail_first") and attempts == 0:
            _side(
                "INSERT INTO failures (message_id) VALUES (%s) ON CONFLICT DO NOTHING",
                (message.message_id,),
            )
            raise RuntimeError(f"injected first-attempt failure of {value}")
        if value.get("chain"):
            publish(session, CHAINED, {"from": str(message.message_id)}, key=message.key)


if os.environ.get("TEST_POISON_TOPIC"):
    # messages that never raise and still never succeed: their process exits, they hang
    # past the time limit, or their writes break a deferred foreign key at COMMIT

    @outbox_handler(
        os.environ["TEST_POISON_TOPIC"],
        name="outbox.tests.poison",
        max_retries=2,
        retry_backoff=1,
        retry_backoff_max=1,
        retry_jitter=False,
        time_limit=3,
    )
    def poison(message, tx):
        value = message.value
        if value.get("exit") or value.get("hang") or value.get("orphan"):
            _side(
                "INSERT INTO poison_calls VALUES (%s, %s)",
                (message.message_id, _attempts(tx, poison.name, message)),
            )
        if value.get("exit"):
            os._exit(1)
        if value.get("hang"):
            time.sleep(value["hang"])
        if value.get("orphan"):
            tx.execute("INSERT INTO children (parent) VALUES (-1)")  # no such parent
        if value.get("pause"):  # slow, but well within the time limit
            time.sleep(value["pause"])
        _effect(tx, "poison", message)


if os.environ.get("TEST_BATCH"):
    # a batch handler of the test topic: a round's messages, written with one INSERT

    @outbox_handler(
        TOPIC, name="outbox.tests.batch", batch=True, max_retries=2, retry_backoff_max=1
    )
    def batch(messages, tx):
        """Notes each call's messages (outside its transaction); ``poison`` fails every
        time, ``fail_first`` fails its delivery's first attempt."""
        ids = [str(m.message_id) for m in messages]
        _side("INSERT INTO batch_calls (ids) VALUES (%s::uuid[])", (ids,))
        tx.execute(
            "SELECT message_id, attempts FROM outbox_bridge.deliveries"
            " WHERE handler = 'outbox.tests.batch' AND message_id = ANY(%s::uuid[])",
            (ids,),
        )
        attempts = dict(tx.fetchall())
        for m in messages:
            if m.value.get("poison"):
                raise RuntimeError(f"poison: fails every time (seq {m.value['seq']})")
            if m.value.get("fail_first") and attempts[m.message_id] == 0:
                raise RuntimeError(f"injected first-attempt failure (seq {m.value['seq']})")
        tx.execute(
            "INSERT INTO effects (handler, message_id, k, seq) SELECT 'batch', *"
            " FROM unnest(%s::uuid[], %s::text[], %s::int[])",
            (ids, [m.value["k"] for m in messages], [m.value["seq"] for m in messages]),
        )
