"""``outbox-bridge soak``: traffic through the whole pipeline under injected faults,
reconciled against a ledger of every message.

Writers (``writers.py``) publish in real transactions; two or more workers
(``celery -A outbox_bridge worker`` with watcher and consumer) relay them and
run two handlers (``handlers.py``); faults (``faults.py``) hit the workers
and the services at seeded times; after the drain, ``reconcile.py`` checks
the ledger (``ledger.py``) against Kafka and the database.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import psycopg2
from confluent_kafka.admin import AdminClient, NewTopic

from ...config import Settings, kafka_client
from ...db import connect, recreate_database
from ...migrate import migrate
from ...outbox.kafka import ORDER_BROKEN
from .cluster import Cluster
from .faults import (
    ALL_KINDS,
    BROKER_KINDS,
    CLUSTER_KINDS,
    ELECTED_WITHIN,
    KINDS,
    Faults,
    Worker,
    schedule,
)
from .ledger import COMMITTED, ROLLED_BACK, UNKNOWN, Ledger
from .proxy import Proxy
from .reconcile import read_topic, reconcile
from .samples import Sampler, load, plot
from .writers import ADAPTERS, Writer

# from the handlers' own effects, not the inbox: with a short dedupe window (a long
# run's) retention forgets handled messages while the run goes on
_DRAINED = """
SELECT (SELECT count(*) FROM outbox_bridge.outbox WHERE state <> 'expired')
         + (SELECT count(*) FROM outbox_bridge.scheduled),
       (SELECT count(DISTINCT message_id) FROM soak_effects WHERE handler = 'soak.effect'),
       (SELECT count(*) FROM outbox_bridge.deliveries
        WHERE state NOT IN ('done', 'dead', 'expired')),
       (SELECT count(DISTINCT message_id) FROM soak_effects WHERE handler = 'soak.flaky'),
       (SELECT count(*) FROM outbox_bridge.outbox WHERE state = 'expired'),
       (SELECT count(*) FROM outbox_bridge.deliveries
        WHERE state = 'expired' AND handler = 'soak.effect'),
       (SELECT count(*) FROM outbox_bridge.deliveries
        WHERE state = 'expired' AND handler = 'soak.flaky')
"""
_SCHEMA = """
CREATE TABLE soak_effects (seq bigserial PRIMARY KEY, message_id uuid NOT NULL,
                           handler text NOT NULL, key bytea);
-- one row per writer transaction, written in it: it exists iff the transaction committed
CREATE TABLE soak_commits (tx uuid PRIMARY KEY DEFAULT gen_random_uuid());
"""


@dataclass
class Options:
    seconds: float = 60.0  # of traffic
    rate: float = 100.0  # messages/s offered, all writers together
    writers: int = 4
    workers: int = 2
    concurrency: int = 2
    pool: str = "prefork"
    adapter: str = "psycopg2"
    faults: int = 6
    kinds: tuple[str, ...] = ()  # (): KINDS, or CLUSTER_KINDS with ``cluster``
    # on the three-broker cluster (``scripts/services up kafka-cluster``): its bootstrap
    # servers from OUTBOX_BRIDGE_KAFKA_CLUSTER, topics with three replicas, broker faults
    cluster: bool = False
    seed: int = 1
    rollback_rate: float = 0.1
    keyless_rate: float = 0.1
    fail_rate: float = 0.2
    poison: int = 2
    # the message model: shares of delayed (up to delay_max s), expiring (a ttl up to
    # ttl_max s: some expire in a fault) and reply-asking messages; a delayed message
    # counts as on time when it reaches Kafka within on_time s of its deliver_at
    delayed_rate: float = 0.05
    delay_max: float = 10.0
    expiring_rate: float = 0.05
    ttl_max: float = 20.0
    reply_rate: float = 0.05
    on_time: float = 5.0
    max_tail: float = 120.0  # seconds from the last write or fault to drained, at most
    silence: float = 60.0  # of a blackhole fault
    sample_every: float = 60.0  # seconds between samples of sizes and resources
    plot: Path | None = None  # a PNG of the samples
    services: str = "scripts/services"
    logdir: Path = field(default_factory=lambda: Path("soak-logs"))


def say(text: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {text}", flush=True)


class Soak:
    def __init__(self, settings: Settings, opts: Options) -> None:
        if opts.pool not in ("prefork", "threads", "solo", "gevent", "eventlet"):
            raise ValueError(f"unknown pool {opts.pool!r}")
        if opts.adapter not in ADAPTERS:
            raise ValueError(f"unknown adapter {opts.adapter!r}: one of {', '.join(ADAPTERS)}")
        opts = replace(opts, kinds=opts.kinds or (CLUSTER_KINDS if opts.cluster else KINDS))
        if set(opts.kinds) - set(ALL_KINDS):
            raise ValueError(f"unknown fault kinds {set(opts.kinds) - set(ALL_KINDS)}: {ALL_KINDS}")
        if opts.cluster:
            if not os.environ.get("OUTBOX_BRIDGE_KAFKA_CLUSTER"):
                raise ValueError(
                    "--cluster needs OUTBOX_BRIDGE_KAFKA_CLUSTER (scripts/services up"
                    ' kafka-cluster; eval "$(scripts/services env)")'
                )
            if {"kafka", "blackhole_kafka"} & set(opts.kinds):
                raise ValueError("on the cluster, Kafka's faults are " + ", ".join(BROKER_KINDS))
            settings = replace(
                settings, kafka_bootstrap_servers=os.environ["OUTBOX_BRIDGE_KAFKA_CLUSTER"]
            )
        elif set(BROKER_KINDS) & set(opts.kinds):
            raise ValueError(f"{', '.join(BROKER_KINDS)} need the cluster (--cluster)")
        if opts.workers < 2:
            raise ValueError("the soak needs at least two workers")
        if "blackhole_kafka" in opts.kinds and not os.environ.get("OUTBOX_BRIDGE_KAFKA_PROXIED"):
            raise ValueError(
                "blackhole_kafka needs OUTBOX_BRIDGE_KAFKA_PROXIED (Kafka's listener"
                ' behind the proxy: eval "$(scripts/services env)")'
            )
        if {"kafka", "postgres", "rabbitmq", *BROKER_KINDS} & set(opts.kinds) and not os.access(
            opts.services, os.X_OK
        ):
            raise ValueError(f"service faults need {opts.services} (--services PATH)")
        self.opts = opts
        self.run_id = uuid.uuid4().hex[:8]
        dsn = psycopg2.extensions.parse_dsn(settings.database_url)
        self.admin_dsn = settings.database_url
        self.db = f"{dsn.get('dbname', 'outbox_bridge')}_soak"
        self.url = psycopg2.extensions.make_dsn(**{**dsn, "dbname": self.db})
        self.settings = replace(settings, database_url=self.url)
        self.topic, self.chained = f"soak-{self.run_id}", f"soak-{self.run_id}-chained"
        self.replies = f"soak-{self.run_id}-replies"
        opts.logdir.mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()
        self.ledger = Ledger(opts.logdir / f"ledger-{self.run_id}.jsonl", self.started)
        self.fault_log: list[dict[str, Any]] = []

    def now(self) -> float:
        return round(time.monotonic() - self.started, 2)

    # -- set-up ---------------------------------------------------------------
    def prepare(self) -> None:
        recreate_database(self.admin_dsn, self.db)
        migrate(self.settings)
        conn = connect(self.settings)
        with conn, conn.cursor() as cur:
            cur.execute(_SCHEMA)
        conn.close()
        kafka = AdminClient(kafka_client(self.settings))
        replicas = 3 if self.opts.cluster else 1
        topics = [NewTopic(t, 3, replicas) for t in (self.topic, self.chained, self.replies)]
        futures = kafka.create_topics(topics)
        for future in futures.values():
            future.result(30)

    def open_proxies(self) -> dict[str, str]:
        """The proxies between the workers and PostgreSQL and Kafka (the blackholes'),
        and the workers' URLs through them."""
        dsn = psycopg2.extensions.parse_dsn(self.url)
        pg = Proxy((dsn.get("host", "127.0.0.1"), int(dsn.get("port", 5432))))
        self.proxies = {"postgres": pg}
        urls = {
            "OUTBOX_BRIDGE_DATABASE_URL": psycopg2.extensions.make_dsn(
                **{**dsn, "host": "127.0.0.1", "port": str(pg.port)}
            )
        }
        behind = os.environ.get("OUTBOX_BRIDGE_KAFKA_PROXIED")
        if behind and not self.opts.cluster:  # the listener that advertises the proxy's port
            host, port = behind.rsplit(":", 1)
            kafka = Proxy(
                (host, int(port)), int(os.environ.get("OUTBOX_BRIDGE_KAFKA_PROXY_PORT", "9095"))
            )
            self.proxies["kafka"] = kafka
            urls["OUTBOX_BRIDGE_KAFKA_BOOTSTRAP_SERVERS"] = kafka.address
        return urls

    def worker_env(self, through: dict[str, str]) -> dict[str, str]:
        return {
            **os.environ,
            "OUTBOX_BRIDGE_DATABASE_URL": self.url,
            "OUTBOX_BRIDGE_KAFKA_BOOTSTRAP_SERVERS": self.settings.kafka_bootstrap_servers,
            "OUTBOX_BRIDGE_CELERY_QUEUE": f"soak-{self.run_id}",
            "OUTBOX_BRIDGE_SOAK_TOPIC": self.topic,
            "OUTBOX_BRIDGE_SOAK_CHAINED": self.chained,
            "OUTBOX_BRIDGE_SOAK_FAIL_RATE": str(self.opts.fail_rate),
            **through,
        }

    # -- the run --------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        o = self.opts
        say(
            f"run {self.run_id}: {o.seconds:.0f}s at {o.rate:.0f}/s, {o.writers} writers"
            f" ({o.adapter}), {o.workers} workers (-P {o.pool}), {o.faults} faults, seed {o.seed}"
        )
        # SIGTERM (a timeout, an operator) ends the run through its `finally`: the
        # workers it started are stopped, not left running against the services
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        self.prepare()
        env = self.worker_env(self.open_proxies())
        make = lambda name: Worker(name, env, o.logdir, o.pool, o.concurrency)  # noqa: E731
        workers = [make(f"soak{i}-{self.run_id}") for i in range(o.workers)]
        spare = make(f"soak-spare-{self.run_id}")
        result: dict[str, Any] = {}
        self.sampler = Sampler(
            o.logdir / f"samples-{self.run_id}.jsonl",
            o.sample_every,
            lambda: {w.name: w.proc.pid for w in workers if w.proc and w.proc.poll() is None},
            self._query,
            self._lag,
            self.settings.schema,
        )
        try:
            for w in workers:
                w.start()
            self.sampler.start()
            result = self._traffic(workers, spare)
            return result
        finally:
            self.sampler.stop()
            for w in [*workers, spare]:
                w.stop()
            for proxy in self.proxies.values():
                proxy.close()
            self.ledger.close()
            if result:
                result["samples"] = self._samples()
            if result and not result["violations"]:  # else they are evidence: kept
                # fewer partitions: Kafka's next restart recovers faster
                kafka = AdminClient(kafka_client(self.settings))
                kafka.delete_topics([self.topic, self.chained, self.replies])

    def _traffic(self, workers: list[Worker], spare: Worker) -> dict[str, Any]:
        """Writers run for ``seconds`` and until the last fault is over, so that
        every fault meets traffic."""
        o = self.opts
        t0 = time.monotonic()
        stop = threading.Event()
        writers = [
            Writer(i, self.url, self.topic, self.ledger, stop, o, self.replies)
            for i in range(o.writers)
        ]
        for w in writers:
            w.start()
        plan = self.plan = schedule(o.seed, o.faults, o.kinds, 0.1 * o.seconds, 0.85 * o.seconds)
        urls = {
            "OUTBOX_BRIDGE_KAFKA_BOOTSTRAP_SERVERS": self.settings.kafka_bootstrap_servers,
            "OUTBOX_BRIDGE_DATABASE_URL": self.url,
            "CELERY_BROKER_URL": os.environ.get("CELERY_BROKER_URL", ""),
        }
        cluster = None
        if o.cluster:
            state = Path(os.environ.get("OUTBOX_BRIDGE_KAFKA_CLUSTER_STATE", ".services"))
            cluster = Cluster(self.settings, state, self.topic, o.services)
        faults = Faults(
            workers,
            spare,
            o.services,
            self.addresses(urls),
            random.Random(o.seed),
            self.proxies,
            o.silence,
            self._query,
            cluster,
        )
        for at, kind in plan:
            time.sleep(max(0.0, t0 + at - time.monotonic()))
            began = self.now()
            say(f"fault {len(self.fault_log) + 1}/{len(plan)} at {began}s: {kind}")
            result = faults.inject(kind)
            result.update(planned=at, began=began, ended=self.now())
            say(f"  {result['detail']} (verified: {result['verified']})")
            self.fault_log.append(result)
        if cluster is not None:
            cluster.close()
        # traffic goes on a moment after the last fault, and for ``seconds`` at least
        time.sleep(max(2.0, t0 + o.seconds - time.monotonic()))
        stop.set()
        for w in writers:
            w.join()
        self.writer_errors = {w.index: (w.errors, w.first_error) for w in writers if w.errors}
        last_write = self.now()
        last_fault = max((f["ended"] for f in self.fault_log), default=0.0)
        say(f"traffic over at {last_write}s: {self.ledger.attempted()} messages attempted")
        settled = self._resolve_unknown()
        drained_at = self._drain(max(last_write, last_fault))
        return self._report(last_write, last_fault, drained_at, settled)

    @staticmethod
    def addresses(urls: dict[str, str]) -> dict[str, tuple[str, int]]:
        """Where each service listens (from the settings' URLs), to show it is down."""
        kafka = urls["OUTBOX_BRIDGE_KAFKA_BOOTSTRAP_SERVERS"].split(",")[0].rsplit(":", 1)
        pg = psycopg2.extensions.parse_dsn(urls["OUTBOX_BRIDGE_DATABASE_URL"])
        amqp = urls.get("CELERY_BROKER_URL") or "amqp://127.0.0.1:5672//"
        host_port = amqp.split("@")[-1].split("/")[0]
        return {
            "kafka": (kafka[0], int(kafka[1])),
            "postgres": (pg.get("host", "127.0.0.1"), int(pg.get("port", 5432))),
            "rabbitmq": (
                host_port.rpartition(":")[0] or "127.0.0.1",
                int(host_port.rpartition(":")[2] or 5672),
            ),
        }

    def _query(self, sql: str, params: Any = None) -> list[tuple]:
        deadline = time.monotonic() + 120
        while True:
            try:
                conn = connect(self.settings, name="outbox-bridge soak")
                try:
                    with conn, conn.cursor() as cur:
                        cur.execute(sql, params)
                        return cur.fetchall()
                finally:
                    conn.close()
            except psycopg2.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)

    def _lag(self) -> int | None:
        """The workers' inbox consumer lag on the soak's topic, in records (the chained
        topic has no handler: only the reconciliation reads it)."""
        from ...db import transaction
        from ...inbox.consumer import consumer_group
        from ...ops import consumer_lag

        if not hasattr(self, "group"):
            with transaction(self.settings, "outbox-bridge soak") as cur:
                self.group = consumer_group(cur, self.settings)
        lag = consumer_lag(self.settings, self.group, [self.topic])
        return sum(p["lag"] for p in lag)

    def _samples(self) -> dict[str, Any]:
        """Where the samples are, and how each measure moved from the end of the warm-up
        (a tenth of the run) to the end: what grew shows here."""
        samples = load(self.sampler.path)
        out: dict[str, Any] = {"path": str(self.sampler.path), "count": len(samples)}
        if self.opts.plot and samples:
            title = (
                f"soak {self.run_id}: {self.ledger.attempted()} messages,"
                f" {len(self.fault_log)} faults"
            )
            out["plot"] = str(plot(samples, self.opts.plot, title))
        if len(samples) >= 3:
            warm = samples[max(1, len(samples) // 10)]
            last = samples[-1]
            growth = {}
            for field in ("rss_mb", "fds", "relations_kb"):
                for name, end in (last.get(field) or {}).items():
                    start = (warm.get(field) or {}).get(name)
                    if start is not None:
                        growth[f"{field}: {name}"] = [start, end]
            growth["pg_connections"] = [warm.get("pg_connections"), last.get("pg_connections")]
            out["from_warm_to_end"] = growth
        return out

    def _resolve_unknown(self) -> dict[str, int]:
        txs = sorted(
            {e.txid for e in self.ledger.entries if e.outcome == UNKNOWN and e.txid is not None}
        )
        found = {
            r[0]
            for r in self._query(
                "SELECT tx::text FROM soak_commits WHERE tx = ANY(%s::uuid[])", (txs,)
            )
        }
        return self.ledger.resolve({t: "committed" if t in found else "aborted" for t in txs})

    def _drain(self, since: float) -> float | None:
        """Seconds after ``since`` when all is drained and handled; None: not within max_tail."""
        committed = [e.message_id for e in self.ledger.entries if e.outcome == COMMITTED]
        poison = sum(1 for e in self.ledger.entries if e.poison and e.outcome == COMMITTED)
        self._progress = time.monotonic()
        while True:
            ((outbox, stored, unsettled, flaky, expired, gone, gone_flaky),) = self._query(_DRAINED)
            if (
                outbox == 0
                and stored + expired + gone >= len(committed)
                and not unsettled
                and flaky + poison + expired + gone_flaky >= len(committed)
            ):
                return round(self.now() - since, 1)
            if time.monotonic() - self._progress > 10:
                self._progress = time.monotonic()
                say(
                    f"  draining: outbox {outbox}, handled {stored}/{len(committed)},"
                    f" deliveries unsettled {unsettled}"
                )
            if self.now() - since > self.opts.max_tail:
                say(
                    f"not drained {self.opts.max_tail:.0f}s after the last write or fault:"
                    f" outbox {outbox}, handled {stored}/{len(committed)}, unsettled {unsettled}"
                )
                return None
            time.sleep(0.5)

    def _report(
        self, last_write: float, last_fault: float, drained: float | None, settled: dict[str, int]
    ) -> dict[str, Any]:
        events = read_topic(self.settings, self.topic)
        chained = read_topic(self.settings, self.chained)
        replies = read_topic(self.settings, self.replies)
        outbox = dict(self._query("SELECT state, count(*) FROM outbox_bridge.outbox GROUP BY 1"))
        deliveries: dict[str, dict[str, int]] = {}
        for handler, state, n in self._query(
            "SELECT handler, state, count(*) FROM outbox_bridge.deliveries GROUP BY 1, 2"
        ):
            deliveries.setdefault(handler, {})[state] = n
        db = {
            "effects": [
                (h, None if k is None else bytes(k).decode(), str(m))
                for h, k, m in self._query(
                    "SELECT handler, key, message_id FROM soak_effects ORDER BY seq"
                )
            ],
            "outbox": outbox,
            "deliveries": deliveries,
            "dead": [
                (str(m), h)
                for m, h in self._query(
                    "SELECT message_id, handler FROM outbox_bridge.deliveries WHERE state = 'dead'"
                )
            ],
            "expired_outbox": {
                str(m)
                for (m,) in self._query(
                    "SELECT message_id FROM outbox_bridge.outbox WHERE state = 'expired'"
                )
            },
            "expired_deliveries": {
                (str(m), h)
                for m, h in self._query(
                    "SELECT message_id, handler FROM outbox_bridge.deliveries"
                    " WHERE state = 'expired'"
                )
            },
            "on_time": self.opts.on_time,
            "ledger_wall": self.ledger.wall,
            "retried": self._query(
                "SELECT count(*) FROM outbox_bridge.deliveries"
                " WHERE handler = 'soak.flaky' AND attempts > 0"
            )[0][0],
            "fail_rate": self.opts.fail_rate,
        }
        result = reconcile(self.ledger.entries, events, chained, db, replies)
        counts = {
            k: sum(1 for e in self.ledger.entries if e.outcome == k)
            for k in (COMMITTED, ROLLED_BACK, UNKNOWN)
        }
        violations = result["violations"]
        if drained is None:
            violations.append(
                f"not drained within {self.opts.max_tail:.0f}s of the last write or fault"
            )
        if counts[COMMITTED] < 10 * max(1, self.opts.faults):
            violations.append(
                f"too little traffic to judge: {counts[COMMITTED]} committed"
                f" (writers' errors: {self.writer_errors})"
            )
        unelected = [
            f for f in self.fault_log if "elected_after_s" in f and f["elected_after_s"] is None
        ]
        if unelected:
            which = [f"{f['kind']}@{f['began']}s" for f in unelected]
            violations.append(f"no dispatcher elected within {ELECTED_WITHIN:.0f}s after {which}")
        unverified = [f for f in self.fault_log if not f["verified"]]
        if unverified:
            violations.append(f"{len(unverified)} faults not shown to have happened: {unverified}")
        # what the relays said they saw (kafka.order_breaks): the why of a violation
        broken = [
            line.strip()
            for path in sorted(self.opts.logdir.glob(f"*-{self.run_id}.log"))
            for line in path.read_text(errors="replace").splitlines()
            if ORDER_BROKEN in line
        ]
        missing_kinds = {k for _, k in self.plan} - {f["kind"] for f in self.fault_log}
        if self.opts.pool != "prefork":
            missing_kinds.discard("kill_child")  # run as kill_worker: no pool processes
        if missing_kinds:
            violations.append(f"fault kinds that did not run: {sorted(missing_kinds)}")
        return {
            "run": self.run_id,
            "options": {k: str(v) for k, v in self.opts.__dict__.items()},
            "ledger": {
                "path": str(self.ledger.path),
                "attempted": self.ledger.attempted(),
                **counts,
                "unknown_settled": settled,
                "poison": sum(
                    1 for e in self.ledger.entries if e.poison and e.outcome == COMMITTED
                ),
            },
            "faults": self.fault_log,
            "writer_errors": {str(k): v for k, v in self.writer_errors.items()},
            "last_write_s": last_write,
            "last_fault_s": last_fault,
            "drained_after_s": drained,
            "relay_order_breaks": {"count": len(broken), "first": broken[:5]},
            "drained_after_last_write_s": None
            if drained is None
            else round(max(last_write, last_fault) + drained - last_write, 1),
            **result,
        }


def summary(r: dict[str, Any]) -> str:
    led, fig = r["ledger"], r["figures"]
    lines = [
        f"soak {r['run']}: {led['attempted']} messages attempted: {led['committed']} committed,"
        f" {led['rolled_back']} rolled back, {led['unknown']} unknown after settling"
        f" ({led['unknown_settled']}); {led['poison']} poison",
        f"faults: {len(r['faults'])} ("
        + ", ".join(
            f"{f['kind']}@{f['began']}s{'' if f['verified'] else ' UNVERIFIED'}"
            for f in r["faults"]
        )
        + ")",
        f"kafka: {fig['kafka_records']} records, {fig['kafka_distinct']} distinct,"
        f" {fig['kafka_duplicates']} duplicates; chained {fig['chained_records']}"
        f" ({fig['chained_duplicates']} duplicates); lost {fig['lost']}, phantom"
        f" {fig['phantom']}, keys out of order {fig['keys_out_of_order']} of {fig['keys']}",
    ]
    for handler in ("soak.effect", "soak.flaky"):
        h = fig[handler]
        lines.append(
            f"{handler}: once {h['once']}, missing {h['missing']}, doubled"
            f" {h['doubled']}, stray {h['stray']}, keys out of order"
            f" {h['keys_out_of_order']}"
        )
    lines.append(
        f"flaky deliveries retried {fig['flaky_deliveries_retried']}; dead on purpose"
        f" {fig['dead_deliveries_injected']}; outbox left {fig['outbox_left']}"
    )
    model = fig.get("model")
    if model:
        d, x, y = model["delayed"], model["expiring"], model["replies"]
        lines.append(
            f"delayed {d['count']}: on time {d['on_time']}, late {d['late']}, early"
            f" {d['early']}, lateness p50 {d['lateness_p50_s']}s p99 {d['lateness_p99_s']}s"
            f" max {d['lateness_max_s']}s (plain messages, commit to Kafka: p50"
            f" {d['plain_latency_p50_s']}s p99 {d['plain_latency_p99_s']}s);"
            f" expiring {x['count']}: sent {x['sent']}, expired"
            f" {x['expired']} (after an unacknowledged send {x['sent_then_expired']}), sent"
            f" late {x['sent_late']}, deliveries expired {x['deliveries_expired']}; replies"
            f" {y['expected']} expected, {y['answered']} answered, {y['missing']} missing,"
            f" {y['stray']} stray, {y['wrong']} wrong"
        )
    lines.append(
        f"drained {r['drained_after_s']}s after the last write or fault"
        f" (last write {r['last_write_s']}s, last fault {r['last_fault_s']}s)"
    )
    samples = r.get("samples") or {}
    if samples:
        plotted = f", plotted in {samples['plot']}" if samples.get("plot") else ""
        lines.append(f"samples: {samples['count']} in {samples['path']}{plotted}")
        moved = samples.get("from_warm_to_end") or {}
        for name, (start, end) in sorted(moved.items()):
            if name.startswith(("rss_mb", "fds", "pg_")) or (end or 0) >= 1024:
                lines.append(f"  {name}: {start} -> {end} (after warm-up -> end)")
    breaks = r.get("relay_order_breaks") or {}
    if breaks.get("count"):
        lines.append(f"relays reported {breaks['count']} key order breaks, first:")
        lines += [f"  {b}" for b in breaks["first"]]
    lines.append("violations: " + ("none" if not r["violations"] else ""))
    lines += [f"  - {v}" for v in r["violations"]]
    return "\n".join(lines)
