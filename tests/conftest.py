"""Fixtures for tests against real PostgreSQL, Kafka and RabbitMQ.

Each service comes from the environment (``scripts/test`` starts the native
stack and exports it), else from testcontainers when a Docker engine answers.
Without either, service tests fail under ``CI=true`` and skip otherwise.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg2
import pytest
from confluent_kafka import Consumer
from confluent_kafka.admin import AdminClient, NewTopic

from outbox_bridge.config import Settings, reset_settings
from outbox_bridge.db import channel
from outbox_bridge.migrate import migrate

ROOT = Path(__file__).resolve().parent.parent
ENV_NAMES = (
    "OUTBOX_BRIDGE_DATABASE_URL",
    "OUTBOX_BRIDGE_KAFKA_BOOTSTRAP_SERVERS",
    "CELERY_BROKER_URL",
)


def wait_for(condition: Callable[[], object], timeout: float, what: str, every: float = 0.1):
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


def _docker_answers() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _from_containers(stack) -> dict[str, str]:
    from testcontainers.kafka import KafkaContainer
    from testcontainers.postgres import PostgresContainer
    from testcontainers.rabbitmq import RabbitMqContainer

    pg = stack.enter_context(PostgresContainer("postgres:15", driver=None))
    kafka = stack.enter_context(KafkaContainer("apache/kafka:4.1.1").with_kraft())
    rabbit = stack.enter_context(RabbitMqContainer("rabbitmq:3-management"))
    params = rabbit.get_connection_params()
    return {
        "OUTBOX_BRIDGE_DATABASE_URL": pg.get_connection_url(),
        "OUTBOX_BRIDGE_KAFKA_BOOTSTRAP_SERVERS": kafka.get_bootstrap_server(),
        "CELERY_BROKER_URL": f"amqp://guest:guest@{params.host}:{params.port}//",
    }


class NativeServices:
    """Stops and starts the services of ``scripts/services``; each stop is checked: the
    service's port refuses connections afterwards."""

    script = str(ROOT / "scripts" / "services")

    def __init__(self, urls: dict[str, str]):
        from outbox_bridge.tools.soak import Soak  # the same port lookup as the soak's faults

        self.ports = Soak.addresses(urls)

    def _run(self, *args: str, timeout: float = 300) -> None:
        subprocess.run([self.script, *args], check=True, timeout=timeout, capture_output=True)

    def down(self, name: str, how: str = "down") -> None:
        from outbox_bridge.tools.soak.faults import refused

        self._run(how, name)
        assert refused(*self.ports[name]), f"{name} still answers after `services {how}`"

    def up(self, name: str) -> None:
        self._run("up", name)


@pytest.fixture
def native_services(services) -> NativeServices:
    """For tests marked ``services``: the running services must be the native ones of
    ``scripts/services``, which these tests stop and start (skip otherwise; fail on CI)."""
    status = subprocess.run([NativeServices.script, "status"], capture_output=True, text=True)
    if status.returncode != 0 or "pid -" in status.stdout:
        reason = (
            "this test stops and starts the native services; scripts/services does not"
            f" run them here:\n{status.stdout}"
        )
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return NativeServices(services)


@pytest.fixture(autouse=True)
def _services_marker_needs_native(request):
    """A test that stops services must say so (marker) and get them from the script."""
    if "native_services" in request.fixturenames:
        assert request.node.get_closest_marker("services"), "mark it @pytest.mark.services"


@pytest.fixture(scope="session")
def services() -> Iterator[dict[str, str]]:
    """URLs of the three services, from the environment or testcontainers."""
    found = {name: os.environ.get(name, "") for name in ENV_NAMES}
    if all(found.values()):
        yield found
        return
    if _docker_answers():
        from contextlib import ExitStack

        with ExitStack() as stack:
            urls = _from_containers(stack)
            os.environ.update(urls)
            yield urls
        return
    reason = (
        "PostgreSQL, Kafka and RabbitMQ are not configured (set "
        + ", ".join(ENV_NAMES)
        + " or run scripts/test, which starts them) and no Docker engine answers"
    )
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def _with_db(url: str, dbname: str) -> str:
    dsn = psycopg2.extensions.parse_dsn(url)
    dsn["dbname"] = dbname
    return psycopg2.extensions.make_dsn(**dsn)


# Databases of this test session start with this prefix (its pid): two sessions
# on one server never drop each other's databases.
SESSION_PREFIX = f"ob_{os.getpid()}_"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@pytest.fixture(scope="session")
def template_db(services) -> Iterator[str]:
    """A migrated database that every test's database is cloned from."""
    admin = psycopg2.connect(services["OUTBOX_BRIDGE_DATABASE_URL"])
    admin.autocommit = True
    template = SESSION_PREFIX + "template"
    with admin.cursor() as cur:
        cur.execute(r"SELECT datname FROM pg_database WHERE datname ~ '^ob_\d+_'")
        for (stale,) in cur.fetchall():  # left by a session that is gone
            if not _pid_alive(int(stale.split("_")[1])):
                cur.execute(f'DROP DATABASE IF EXISTS "{stale}" WITH (FORCE)')
        cur.execute(f'CREATE DATABASE "{template}"')
    admin.close()
    url = _with_db(services["OUTBOX_BRIDGE_DATABASE_URL"], template)
    migrate(Settings(database_url=url))
    yield template
    admin = psycopg2.connect(services["OUTBOX_BRIDGE_DATABASE_URL"])
    admin.autocommit = True
    with contextlib.suppress(psycopg2.Error), admin.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{template}" WITH (FORCE)')
    admin.close()


def create_database(admin_url: str, template: str) -> tuple[str, Callable[[], None]]:
    """A new database cloned from ``template``: its URL, and how to drop it."""
    name = SESSION_PREFIX + uuid.uuid4().hex[:12]
    admin = psycopg2.connect(admin_url)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')

    def drop() -> None:
        try:
            with admin.cursor() as cur:
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        except psycopg2.Error:
            pass  # PostgreSQL may be restarting in a fault test; the next run drops leftovers
        admin.close()

    return _with_db(admin_url, name), drop


@pytest.fixture
def db_url(services, template_db, monkeypatch) -> Iterator[str]:
    """A fresh, migrated database for this test; the process's settings point at it."""
    url, drop = create_database(services["OUTBOX_BRIDGE_DATABASE_URL"], template_db)
    monkeypatch.setenv("OUTBOX_BRIDGE_DATABASE_URL", url)
    reset_settings()
    yield url
    reset_settings()
    drop()


@pytest.fixture
def conn(db_url) -> Iterator[psycopg2.extensions.connection]:
    c = psycopg2.connect(db_url)
    yield c
    c.close()


def sqlalchemy_url(url: str, driver: str) -> str:
    """The libpq ``url`` as a SQLAlchemy URL for ``driver`` (psycopg2, psycopg, asyncpg)."""
    from sqlalchemy.engine import make_url

    dsn = psycopg2.extensions.parse_dsn(url)
    return (
        make_url(f"postgresql+{driver}://")
        .set(
            username=dsn.get("user"),
            password=dsn.get("password"),
            host=dsn.get("host"),
            port=int(dsn["port"]) if dsn.get("port") else None,
            database=dsn.get("dbname"),
        )
        .render_as_string(hide_password=False)
    )


def query(url: str, sql: str, params: tuple = ()) -> list[tuple]:
    """Run one statement in a transaction of its own; its rows ([] when it returns none)."""
    c = psycopg2.connect(url)
    try:
        with c, c.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall() if cur.description else []
    finally:
        c.close()


def watcher_idle(url: str) -> bool:
    """An idle dispatcher holds the outbox's idle lock: it has looked, found nothing
    for a second, and waits for NOTIFY or its timer. Asked as a writer asks it."""
    lock = "SELECT NOT pg_try_advisory_xact_lock_shared(hashtext(%s || ' idle'))"
    found = query(url, lock, (channel("outbox_bridge", "outbox"),))
    return bool(found[0][0])


def rows(url: str, where: str = "true") -> list[tuple]:
    """(id, topic, key, state, attempts, last_error) of outbox rows, oldest first."""
    c = psycopg2.connect(url)
    try:
        with c, c.cursor() as cur:
            cur.execute(
                "SELECT id, topic, encode(key, 'escape'), state, attempts, last_error"
                f" FROM outbox_bridge.outbox WHERE {where} ORDER BY id"
            )
            return cur.fetchall()
    finally:
        c.close()


@pytest.fixture
def kafka_admin(services) -> AdminClient:
    return AdminClient({"bootstrap.servers": services["OUTBOX_BRIDGE_KAFKA_BOOTSTRAP_SERVERS"]})


@pytest.fixture
def topic(request, kafka_admin) -> Iterator[str]:
    """A new Kafka topic for this test, created before use (the test stack, like most
    production clusters, does not create topics on the fly): 4 partitions, unless
    ``@pytest.mark.kafka_topic(partitions=..., config={...})`` says otherwise. It and
    the topics named after it are deleted afterwards: a broker with fewer partitions
    restarts faster (the fault tests and the soak restart it)."""
    name = "t-" + uuid.uuid4().hex[:10]
    marker = request.node.get_closest_marker("kafka_topic")
    options = marker.kwargs if marker else {}
    create_topic(kafka_admin, name, options.get("partitions", 4), **options.get("config", {}))
    yield name
    with contextlib.suppress(Exception):  # Kafka may be down after a fault test
        mine = [t for t in kafka_admin.list_topics(timeout=5).topics if t.startswith(name)]
        kafka_admin.delete_topics(mine)


def create_topic(admin: AdminClient, name: str, partitions: int = 4, **config: str) -> None:
    futures = admin.create_topics([NewTopic(name, partitions, 1, config=config)])
    futures[name].result(30)
    # metadata reaches every client a moment later
    wait_for(
        lambda: (
            name in admin.list_topics(name, timeout=10).topics
            and admin.list_topics(name, timeout=10).topics[name].error is None
        ),
        30,
        f"topic {name} to be known",
    )


class KafkaReader:
    """Reads a topic from the beginning; keeps everything read so far."""

    def __init__(self, bootstrap: str, topic: str):
        self.consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": "test-" + uuid.uuid4().hex,
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
                "topic.metadata.refresh.interval.ms": 1000,
            }
        )
        self.consumer.subscribe([topic])
        self.messages: list = []

    def read(self, count: int, timeout: float) -> list:
        """Wait until at least ``count`` messages have been read in all."""
        deadline = time.monotonic() + timeout
        while len(self.messages) < count and time.monotonic() < deadline:
            msg = self.consumer.poll(0.2)
            if msg is not None and not msg.error():
                self.messages.append(msg)
        if len(self.messages) < count:
            pytest.fail(f"read {len(self.messages)} of {count} messages in {timeout}s")
        return self.messages

    def read_message_ids(self, expected: set[str], timeout: float) -> set[str]:
        """Read until every expected message id was seen (duplicates are allowed)."""
        deadline = time.monotonic() + timeout
        seen = {self._id(m) for m in self.messages}
        while not expected <= seen and time.monotonic() < deadline:
            msg = self.consumer.poll(0.2)
            if msg is not None and not msg.error():
                self.messages.append(msg)
                seen.add(self._id(msg))
        missing = expected - seen
        if missing:
            pytest.fail(f"{len(missing)} of {len(expected)} messages missing after {timeout}s")
        return seen

    @staticmethod
    def _id(msg) -> str:
        return dict(msg.headers() or [])["message_id"].decode()

    def drain(self, quiet: float = 2.0) -> list:
        """Read until nothing new arrives for ``quiet`` seconds."""
        last = time.monotonic()
        while time.monotonic() - last < quiet:
            msg = self.consumer.poll(0.2)
            if msg is not None and not msg.error():
                self.messages.append(msg)
                last = time.monotonic()
        return self.messages

    def close(self) -> None:
        self.consumer.close()


@pytest.fixture
def kafka_reader(services) -> Iterator[Callable[[str], KafkaReader]]:
    readers: list[KafkaReader] = []

    def make(topic: str) -> KafkaReader:
        reader = KafkaReader(services["OUTBOX_BRIDGE_KAFKA_BOOTSTRAP_SERVERS"], topic)
        readers.append(reader)
        return reader

    yield make
    for r in readers:
        r.close()


class WorkerProcess:
    """``celery -A outbox_bridge worker`` as a subprocess, stopped by its pid."""

    def __init__(self, env: dict[str, str], log_path: Path, concurrency: int, args: tuple):
        self.log_path = log_path
        self.name = f"test-{uuid.uuid4().hex[:8]}@%h"
        self.cmd = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "outbox_bridge",
            "worker",
            "-c",
            str(concurrency),
            "-l",
            "info",
            "-n",
            self.name,
            "--without-mingle",
            "--without-gossip",
            *args,
        ]
        self.env = env
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> WorkerProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child writes to it
        self.proc = subprocess.Popen(
            self.cmd, env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        wait_for(
            lambda: b" ready." in self.log_path.read_bytes() or self.proc.poll() is not None,
            timeout,
            "the celery worker to be ready",
        )
        assert self.proc.poll() is None, "worker exited:\n" + self.log_tail()
        return self

    def children(self) -> list[int]:
        out = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(self.proc.pid)], capture_output=True, text=True
        )
        return [int(p) for p in out.stdout.split()]

    def stop(self, timeout: float = 20) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        children = self.children()
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        for pid in children:  # pool processes left behind by a killed parent
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


@pytest.fixture
def worker_env(services, db_url) -> dict[str, str]:
    """Environment for worker subprocesses: this test's database and Celery queue."""
    return {
        **os.environ,
        "OUTBOX_BRIDGE_DATABASE_URL": db_url,
        "OUTBOX_BRIDGE_CELERY_QUEUE": "test-" + uuid.uuid4().hex[:10],
        "OUTBOX_BRIDGE_POLL_INTERVAL": "0.5",
        "OUTBOX_BRIDGE_RETRY_BACKOFF_MAX": "2",
        "OUTBOX_BRIDGE_RETRY_JITTER": "false",
        "PYTHONPATH": str(ROOT),
    }


@pytest.fixture
def start_worker(worker_env, tmp_path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start ``celery -A outbox_bridge worker`` subprocesses; all are stopped at the end."""
    workers: list[WorkerProcess] = []

    def start(concurrency: int = 2, args: tuple = (), **env: str) -> WorkerProcess:
        log_path = tmp_path / f"worker-{len(workers)}.log"
        w = WorkerProcess({**worker_env, **env}, log_path, concurrency, args)
        workers.append(w)
        return w.start()

    yield start
    for w in workers:
        w.stop()
        print(f"--- {w.log_path} ---\n{w.log_tail()}")
