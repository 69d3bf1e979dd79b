"""Reconciliation: the ledger against Kafka and the database, after the drain."""

from __future__ import annotations

import json
import math
import statistics
import uuid
from collections import Counter, defaultdict
from typing import Any, NamedTuple

from confluent_kafka import Consumer, TopicPartition

from ...config import Settings, kafka_client
from .ledger import COMMITTED, ROLLED_BACK, Entry

HANDLERS = ("soak.effect", "soak.flaky")


class Record(NamedTuple):
    partition: int
    offset: int
    key: bytes | None
    value: Any
    message_id: str
    timestamp_ms: int  # the producer's (CreateTime): when the relay produced it
    headers: dict[str, bytes | None]


def read_topic(settings: Settings, topic: str) -> list[Record]:
    """Every record of ``topic`` up to its end now."""
    consumer = Consumer(
        kafka_client(settings, **{"group.id": f"soak-{uuid.uuid4()}", "enable.auto.commit": False})
    )
    try:
        partitions = consumer.list_topics(topic, timeout=30).topics[topic].partitions
        ends = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30)[1]
            for p in partitions
        }
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        out, left = [], {p for p, end in ends.items() if end > 0}
        while left:
            msg = consumer.poll(5)
            if msg is None or msg.error():
                continue
            headers = dict(msg.headers() or [])
            out.append(
                Record(
                    msg.partition(),
                    msg.offset(),
                    msg.key(),
                    json.loads(msg.value()),
                    headers["message_id"].decode(),
                    msg.timestamp()[1],
                    headers,
                )
            )
            if msg.offset() + 1 >= ends[msg.partition()]:
                left.discard(msg.partition())
        return out
    finally:
        consumer.close()


def _first(records: list) -> dict[str, tuple[int, int]]:
    first: dict[str, tuple[int, int]] = {}
    for r in sorted(records, key=lambda r: r[:2]):
        first.setdefault(r.message_id, (r.partition, r.offset))
    return first


def reconcile(
    entries: list[Entry], events: list, chained: list, db: dict[str, Any], replies: list = ()
) -> dict:
    """Figures and violations. ``db``: effects (handler, key, id in order), outbox states,
    delivery states per handler, dead deliveries, retried flaky deliveries, expired
    outbox rows and deliveries, the on-time window of delayed messages."""
    committed = [e for e in entries if e.outcome == COMMITTED]
    rolled_back = {e.message_id for e in entries if e.outcome == ROLLED_BACK}
    committed_ids = {e.message_id for e in committed}
    poison = {e.message_id for e in committed if e.poison}
    seen = Counter(r[4] for r in events)
    violations: list[str] = []
    expired = set(db.get("expired_outbox", ())) & committed_ids
    gone = set(db.get("expired_deliveries", ()))  # (message id, handler)
    first = _first(events)
    # expired in the outbox, and never in Kafka: no handler can have it (one sent before
    # its expiry whose acknowledgement was lost is in Kafka, and handled or expired there)
    unsent = expired - first.keys()

    lost = committed_ids - first.keys() - expired
    phantom = rolled_back & first.keys()
    if lost:
        violations.append(f"{len(lost)} committed messages not in Kafka, e.g. {sorted(lost)[:3]}")
    if phantom:
        violations.append(
            f"{len(phantom)} rolled-back messages in Kafka, e.g. {sorted(phantom)[:3]}"
        )

    model = _model(committed, events, first, replies, db, violations)

    by_key: dict[str, list[str]] = defaultdict(list)
    for e in committed:
        if e.key is not None and e.deliver_at is None:  # a delayed one: outside its key's order
            by_key[e.key].append(e.message_id)
    bad_keys = []
    for key, ids in by_key.items():
        places = [first[i] for i in ids if i in first]  # (partition, offset), publish order
        if places != sorted(places) or len({p for p, _ in places}) > 1:
            bad_keys.append(key)
    if bad_keys:
        violations.append(f"{len(bad_keys)} keys out of publish order in Kafka: {bad_keys[:5]}")

    effects: dict[str, Counter] = {h: Counter() for h in HANDLERS}
    handled: dict[tuple[str, str], list[str]] = defaultdict(list)
    for handler, key, message_id in db["effects"]:
        effects[handler][message_id] += 1
        if key is not None:
            handled[(handler, key)].append(message_id)
    figures: dict[str, Any] = {}
    for handler in HANDLERS:
        expect = committed_ids - (poison if handler == "soak.flaky" else set()) - unsent
        expect -= {m for m, h in gone if h == handler}  # expired before this handler ran
        got = effects[handler]
        missing = expect - got.keys()
        doubled = [m for m, n in got.items() if n > 1]
        stray = got.keys() - expect
        figures[handler] = {
            "once": sum(1 for m in expect if got[m] == 1),
            "missing": len(missing),
            "doubled": len(doubled),
            "stray": len(stray),
        }
        if missing or doubled or stray:
            violations.append(
                f"{handler}: {len(missing)} effects missing, {len(doubled)}"
                f" doubled, {len(stray)} for messages not committed"
            )
        out_of_order = []
        for key, ids in by_key.items():
            ordered = set(ids)  # a delayed message of the key stands outside its order
            seen_order = [m for m in dict.fromkeys(handled[(handler, key)]) if m in ordered]
            if seen_order != [i for i in ids if got[i]]:
                out_of_order.append(key)
        figures[handler]["keys_out_of_order"] = len(out_of_order)
        if out_of_order:
            violations.append(f"{handler}: {len(out_of_order)} keys handled out of order")

    chains = Counter(r[3].get("from") for r in chained)
    no_chain = {m for m in effects["soak.effect"] if m in committed_ids} - chains.keys()
    stray_chain = chains.keys() - effects["soak.effect"].keys()
    if no_chain or stray_chain:
        violations.append(
            f"chained messages: {len(no_chain)} missing, {len(stray_chain)} for"
            " messages never handled"
        )

    outbox_left = sum(n for state, n in db["outbox"].items() if state != "expired")
    if outbox_left:
        violations.append(f"outbox not drained: {dict(db['outbox'])}")
    unsettled = {h: s for h, s in db["deliveries"].items() if set(s) - {"done", "dead", "expired"}}
    if unsettled:
        violations.append(f"deliveries not settled: {unsettled}")
    dead = {(m, h) for m, h in db["dead"]}
    unexpected_dead = {d for d in dead if not (d[1] == "soak.flaky" and d[0] in poison)}
    if unexpected_dead:
        violations.append(f"{len(unexpected_dead)} dead deliveries not injected on purpose")
    if db["fail_rate"] > 0 and db["retried"] == 0:
        violations.append("soak.flaky never failed: the retry fault did not happen")

    figures.update(
        {
            "kafka_records": len(events),
            "kafka_distinct": len(seen),
            "kafka_duplicates": sum(n - 1 for n in seen.values()),
            "chained_records": len(chained),
            "chained_duplicates": sum(n - 1 for n in chains.values()),
            "keys": len(by_key),
            "lost": len(lost),
            "phantom": len(phantom),
            "keys_out_of_order": len(bad_keys),
            "outbox_left": outbox_left,
            "dead_deliveries_injected": len(dead) - len(unexpected_dead),
            "flaky_deliveries_retried": db["retried"],
            "model": model,
        }
    )
    return {"figures": figures, "violations": violations}


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)], 3)


def _model(committed, events, first, replies, db, violations: list[str]) -> dict[str, Any]:
    """Delayed, expiring and reply messages: each where the message model says it must be."""
    stamp = {r.message_id: r.timestamp_ms for r in sorted(events, key=lambda r: r[:2])[::-1]}
    window = db.get("on_time", 5.0)
    delayed = [e for e in committed if e.deliver_at is not None]
    early, lateness = [], []
    for e in delayed:
        if e.message_id not in stamp:
            continue  # lost: counted above
        if stamp[e.message_id] < math.floor(e.deliver_at * 1000):
            early.append(e.message_id)
        lateness.append(max(0.0, stamp[e.message_id] / 1000 - e.deliver_at))
    if early:
        violations.append(f"{len(early)} delayed messages reached Kafka early: {early[:3]}")
    # beside it, what the faults cost every message: a plain one's commit -> produce
    wall = db.get("ledger_wall")
    plain = [
        stamp[e.message_id] / 1000 - (wall + e.at)
        for e in committed
        if wall is not None and e.deliver_at is None and e.message_id in stamp
    ]

    expiring = [e for e in committed if e.expires_at is not None]
    expired = set(db.get("expired_outbox", ()))
    late_sends, sent_then_expired = [], 0
    for e in expiring:
        if e.message_id in stamp:
            # produced (CreateTime) after its expiry: the relay sent an expired message
            if stamp[e.message_id] > e.expires_at * 1000 + 1000:
                late_sends.append(e.message_id)
            sent_then_expired += e.message_id in expired
    if late_sends:
        violations.append(f"{len(late_sends)} messages sent after their expiry: {late_sends[:3]}")
    wrongly_expired = expired - {e.message_id for e in expiring}
    if wrongly_expired:
        violations.append(f"{len(wrongly_expired)} messages without an expiry are expired")
    gone = {(m, h) for m, h in db.get("expired_deliveries", ())}
    no_expiry = {m for m, _h in gone} - {e.message_id for e in expiring}
    if no_expiry:
        violations.append(f"{len(no_expiry)} deliveries expired without an expiry")

    asked = {e.message_id: e.key for e in committed if e.reply}
    handled = {m for h, _k, m in db["effects"] if h == "soak.effect"}
    answers: dict[str, set[str]] = defaultdict(set)
    wrong = 0
    for r in replies:
        request = r.value.get("from")
        correlation = (r.headers.get("correlation_id") or b"").decode()
        key = None if r.key is None else r.key.decode()
        if correlation != request or request not in asked or key != asked.get(request):
            wrong += 1
        answers[request].add(r.message_id)
    missing = [m for m in asked if m in handled and len(answers.get(m, ())) != 1]
    stray = [m for m in answers if m not in asked or m not in handled]
    if missing or stray or wrong:
        violations.append(
            f"replies: {len(missing)} requests without exactly one reply, {len(stray)} replies"
            f" to no handled request, {wrong} with the wrong correlation id or key"
        )
    return {
        "delayed": {
            "count": len(delayed),
            "on_time": sum(1 for late in lateness if late <= window),
            "late": sum(1 for late in lateness if late > window),
            "early": len(early),
            "lateness_p50_s": _quantile(lateness, 0.5),
            "lateness_p99_s": _quantile(lateness, 0.99),
            "lateness_max_s": _quantile(lateness, 1.0),
            "lateness_mean_s": round(statistics.fmean(lateness), 3) if lateness else None,
            "plain_latency_p50_s": _quantile(plain, 0.5),
            "plain_latency_p99_s": _quantile(plain, 0.99),
        },
        "expiring": {
            "count": len(expiring),
            "sent": sum(1 for e in expiring if e.message_id in stamp),
            "expired": len(expired & {e.message_id for e in expiring}),
            "sent_then_expired": sent_then_expired,
            "sent_late": len(late_sends),
            "deliveries_expired": len(gone),
        },
        "replies": {
            "expected": sum(1 for m in asked if m in handled),
            "answered": sum(1 for m in asked if len(answers.get(m, ())) == 1),
            "missing": len(missing),
            "stray": len(stray),
            "wrong": wrong,
            "records": len(replies),
        },
    }
