"""Reconciliation: the ledger against Kafka and the database, after the drain."""

from __future__ import annotations

import json
import uuid
from collections import Counter, defaultdict
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from ...config import Settings, kafka_client
from .ledger import COMMITTED, ROLLED_BACK, Entry

HANDLERS = ("soak.effect", "soak.flaky")


def read_topic(settings: Settings, topic: str) -> list[tuple[int, int, bytes | None, dict, str]]:
    """Every record of ``topic`` up to its end now: (partition, offset, key, value, id)."""
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
                (
                    msg.partition(),
                    msg.offset(),
                    msg.key(),
                    json.loads(msg.value()),
                    headers["message_id"].decode(),
                )
            )
            if msg.offset() + 1 >= ends[msg.partition()]:
                left.discard(msg.partition())
        return out
    finally:
        consumer.close()


def _first(records: list) -> dict[str, tuple[int, int]]:
    first: dict[str, tuple[int, int]] = {}
    for partition, offset, _key, _value, message_id in sorted(records, key=lambda r: r[:2]):
        first.setdefault(message_id, (partition, offset))
    return first


def reconcile(entries: list[Entry], events: list, chained: list, db: dict[str, Any]) -> dict:
    """Figures and violations. ``db``: effects (handler, key, id in order), outbox states,
    delivery states per handler, dead deliveries, retried flaky deliveries."""
    committed = [e for e in entries if e.outcome == COMMITTED]
    rolled_back = {e.message_id for e in entries if e.outcome == ROLLED_BACK}
    committed_ids = {e.message_id for e in committed}
    poison = {e.message_id for e in committed if e.poison}
    first = _first(events)
    seen = Counter(r[4] for r in events)
    violations: list[str] = []

    lost = committed_ids - first.keys()
    phantom = rolled_back & first.keys()
    if lost:
        violations.append(f"{len(lost)} committed messages not in Kafka, e.g. {sorted(lost)[:3]}")
    if phantom:
        violations.append(
            f"{len(phantom)} rolled-back messages in Kafka, e.g. {sorted(phantom)[:3]}"
        )

    by_key: dict[str, list[str]] = defaultdict(list)
    for e in committed:
        if e.key is not None:
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
        expect = committed_ids - (poison if handler == "soak.flaky" else set())
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
        out_of_order = [
            key
            for key, ids in by_key.items()
            if list(dict.fromkeys(handled[(handler, key)])) != [i for i in ids if got[i]]
        ]
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

    outbox_left = sum(db["outbox"].values())
    if outbox_left:
        violations.append(f"outbox not drained: {dict(db['outbox'])}")
    unsettled = {h: s for h, s in db["deliveries"].items() if set(s) - {"done", "dead"}}
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
        }
    )
    return {"figures": figures, "violations": violations}
