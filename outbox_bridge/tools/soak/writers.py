"""The soak's writers: threads that publish in real transactions through one adapter.

Each writer owns its keys (so a key's publish order is that writer's order),
sends a share of its messages to a few hot keys and some without a key, rolls
some transactions back on purpose, and records every message in the ledger.
An error before the commit means the transaction never committed; an error
from the commit itself leaves the outcome unknown until the end, when the
transaction's marker row (``soak_commits``) says whether it committed. (Not
``txid_status()``: after a crash that lost the commit, PostgreSQL can hand the
same transaction id to a later transaction, which then reads as committed.)
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any

from ...outbox.publish import publish, publish_async
from .ledger import COMMITTED, ROLLED_BACK, UNKNOWN, Ledger

ADAPTERS = ("psycopg2", "psycopg", "sqlalchemy", "django", "asyncpg", "psycopg-async")
_TXID = "INSERT INTO soak_commits DEFAULT VALUES RETURNING tx::text"


class _Psycopg2:
    def __init__(self, url: str) -> None:
        import psycopg2

        self.conn = psycopg2.connect(url, connect_timeout=5)

    def begin(self) -> str:
        self.cur = self.conn.cursor()
        self.cur.execute(_TXID)
        return self.cur.fetchone()[0]

    def publish(self, *args: Any, **kwargs: Any) -> Any:
        return publish(self.cur, *args, **kwargs)

    def commit(self) -> None:
        self.conn.commit()

    def rollback(self) -> None:
        self.conn.rollback()

    def close(self) -> None:
        self.conn.close()


class _Psycopg(_Psycopg2):
    def __init__(self, url: str) -> None:
        import psycopg

        self.conn = psycopg.connect(url, connect_timeout=5)


class _SQLAlchemy:
    def __init__(self, url: str) -> None:
        import psycopg2
        from sqlalchemy import create_engine
        from sqlalchemy.pool import NullPool

        connect = lambda: psycopg2.connect(url, connect_timeout=5)  # noqa: E731
        self.engine = create_engine("postgresql+psycopg2://", poolclass=NullPool, creator=connect)

    def begin(self) -> str:
        from sqlalchemy import text
        from sqlalchemy.orm import Session

        self.session = Session(self.engine)
        return self.session.execute(text(_TXID)).scalar_one()

    def publish(self, *args: Any, **kwargs: Any) -> Any:
        return publish(self.session, *args, **kwargs)

    def commit(self) -> None:
        self.session.commit()

    def rollback(self) -> None:
        self.session.rollback()

    def close(self) -> None:
        self.engine.dispose()


class _Asyncpg:
    def __init__(self, url: str) -> None:
        import asyncio

        import asyncpg
        from psycopg2.extensions import parse_dsn

        dsn = parse_dsn(url)
        self.loop = asyncio.new_event_loop()
        self.conn = self.loop.run_until_complete(
            asyncpg.connect(
                host=dsn.get("host"),
                port=dsn.get("port"),
                user=dsn.get("user"),
                password=dsn.get("password"),
                database=dsn.get("dbname"),
                timeout=5,
            )
        )

    def begin(self) -> str:
        self.tx = self.conn.transaction()
        self.loop.run_until_complete(self.tx.start())
        return self.loop.run_until_complete(self.conn.fetchval(_TXID))

    def publish(self, *args: Any, **kwargs: Any) -> Any:
        return self.loop.run_until_complete(publish_async(self.conn, *args, **kwargs))

    def commit(self) -> None:
        self.loop.run_until_complete(self.tx.commit())

    def rollback(self) -> None:
        self.loop.run_until_complete(self.tx.rollback())

    def close(self) -> None:
        try:
            self.loop.run_until_complete(self.conn.close(timeout=2))
        except Exception:  # noqa: BLE001 - the server may be gone
            self.conn.terminate()
        self.loop.close()


class _Django:
    """Django's connection of this thread, inside ``transaction.atomic()``."""

    _lock = threading.Lock()

    def __init__(self, url: str) -> None:
        import django
        from django.conf import settings
        from psycopg2.extensions import parse_dsn

        with self._lock:
            if not settings.configured:
                dsn = parse_dsn(url)
                settings.configure(
                    DATABASES={
                        "default": {
                            "ENGINE": "django.db.backends.postgresql",
                            "NAME": dsn.get("dbname"),
                            "USER": dsn.get("user", ""),
                            "PASSWORD": dsn.get("password", ""),
                            "HOST": dsn.get("host", ""),
                            "PORT": dsn.get("port", ""),
                            "OPTIONS": {"connect_timeout": 5},
                        }
                    }
                )
                django.setup()

    def begin(self) -> str:
        from django.db import connection, transaction

        self.atomic = transaction.atomic()
        self.atomic.__enter__()
        with connection.cursor() as cur:
            cur.execute(_TXID)
            return cur.fetchone()[0]

    def publish(self, *args: Any, **kwargs: Any) -> Any:
        from django.db import connection

        return publish(connection, *args, **kwargs)

    def commit(self) -> None:
        self.atomic.__exit__(None, None, None)

    def rollback(self) -> None:
        error = RuntimeError("rolled back on purpose")
        self.atomic.__exit__(RuntimeError, error, None)

    def close(self) -> None:
        from django.db import connection

        connection.close()


class _PsycopgAsync(_Asyncpg):
    def __init__(self, url: str) -> None:
        import asyncio

        import psycopg

        self.loop = asyncio.new_event_loop()
        self.conn = self.loop.run_until_complete(
            psycopg.AsyncConnection.connect(url, connect_timeout=5)
        )

    def begin(self) -> str:
        async def txid() -> str:
            cur = await self.conn.execute(_TXID)
            return (await cur.fetchone())[0]

        return self.loop.run_until_complete(txid())

    def commit(self) -> None:
        self.loop.run_until_complete(self.conn.commit())

    def rollback(self) -> None:
        self.loop.run_until_complete(self.conn.rollback())

    def close(self) -> None:
        try:
            self.loop.run_until_complete(self.conn.close())
        finally:
            self.loop.close()


_SESSIONS = {
    "psycopg2": _Psycopg2,
    "psycopg": _Psycopg,
    "sqlalchemy": _SQLAlchemy,
    "django": _Django,
    "asyncpg": _Asyncpg,
    "psycopg-async": _PsycopgAsync,
}


class Writer(threading.Thread):
    """Publishes about ``rate / writers`` messages/s until ``stop`` is set."""

    def __init__(
        self,
        index: int,
        url: str,
        topic: str,
        ledger: Ledger,
        stop: threading.Event,
        options: Any,
        replies: str | None = None,
    ) -> None:
        super().__init__(name=f"soak-writer-{index}", daemon=True)
        self.index, self.url, self.topic, self.ledger = index, url, topic, ledger
        self.replies = replies
        self.make = _SESSIONS[options.adapter]
        writers = options.writers
        self.interval = writers / options.rate
        self.stop = stop
        self.rng = random.Random(options.seed * 1000 + index)
        self.opts = options
        self.poison_left = options.poison // writers + (index < options.poison % writers)
        self.errors = 0
        self.first_error: str | None = None
        self.seq = 0

    def _key(self) -> str | None:
        if self.rng.random() < self.opts.keyless_rate:
            return None
        hot = self.rng.random() < 0.3
        return f"w{self.index}-k{self.rng.randrange(3) if hot else self.rng.randrange(3, 50)}"

    def _model(self, poison: bool) -> dict[str, Any]:
        """publish() options of one message: delayed, expiring, asking for a reply, or none."""
        if poison:
            return {}
        opts, roll = self.opts, self.rng.random()
        now = datetime.now(timezone.utc)
        if roll < opts.delayed_rate:
            return {"deliver_at": now + timedelta(seconds=self.rng.uniform(0.5, opts.delay_max))}
        roll -= opts.delayed_rate
        if roll < opts.expiring_rate:
            return {"expires_at": now + timedelta(seconds=self.rng.uniform(2.0, opts.ttl_max))}
        roll -= opts.expiring_rate
        if roll < opts.reply_rate and self.replies:
            return {"reply_to": self.replies}
        return {}

    def run(self) -> None:
        session = None
        next_at = time.monotonic()
        while not self.stop.wait(max(0.0, next_at - time.monotonic())):
            count = self.rng.randint(1, 5)
            next_at += count * self.interval
            plan = [self._key() for _ in range(count)]
            rollback = self.rng.random() < self.opts.rollback_rate
            written: list[tuple] = []
            txid = None
            try:
                session = session or self.make(self.url)
                txid = session.begin()
                for key in plan:
                    poison = key is None and self.poison_left > 0 and not rollback
                    self.seq += 1
                    value = {"w": self.index, "n": self.seq, **({"poison": True} if poison else {})}
                    model = self._model(poison)
                    message_id = session.publish(self.topic, value, key=key, **model)
                    written.append(
                        (
                            str(message_id),
                            key,
                            poison,
                            model["deliver_at"].timestamp() if "deliver_at" in model else None,
                            model["expires_at"].timestamp() if "expires_at" in model else None,
                            "reply_to" in model,
                        )
                    )
                    self.poison_left -= poison
            except Exception as exc:  # noqa: BLE001 - before the commit: it never committed
                self.first_error = self.first_error or f"{type(exc).__name__}: {exc}"
                self.ledger.record(self.index, txid, written, ROLLED_BACK)
                session = self._drop(session)
                continue
            if rollback:
                try:
                    session.rollback()
                except Exception:  # noqa: BLE001
                    session = self._drop(session)
                self.ledger.record(self.index, txid, written, ROLLED_BACK)
                continue
            try:
                session.commit()
            except Exception:  # noqa: BLE001 - did it commit? its marker row will tell
                self.ledger.record(self.index, txid, written, UNKNOWN)
                session = self._drop(session)
                continue
            self.ledger.record(self.index, txid, written, COMMITTED)
        if session is not None:
            with contextlib.suppress(Exception):
                session.close()

    def _drop(self, session: Any) -> None:
        self.errors += 1
        if session is not None:
            with contextlib.suppress(Exception):
                session.close()
        time.sleep(0.2 + self.rng.random() * 0.3)  # the database may be restarting
        return None
