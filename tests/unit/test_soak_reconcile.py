"""The soak's reconciliation of the message model, on a made-up ledger and topic."""

from outbox_bridge.tools.soak.ledger import COMMITTED, Entry
from outbox_bridge.tools.soak.reconcile import Record, reconcile

T0 = 1_800_000_000.0


def entry(m, key="k", at=1.0, **model):
    return Entry(m, 0, None, key, False, COMMITTED, at, **model)


def record(offset, m, ms, key=b"k"):
    return Record(0, offset, key, {}, m, ms, {"message_id": m.encode()})


def db(effects, expired=(), gone=()):
    return {
        "effects": effects,
        "outbox": {"expired": len(expired)} if expired else {},
        "deliveries": {},
        "dead": [],
        "retried": 1,
        "fail_rate": 0.0,
        "expired_outbox": set(expired),
        "expired_deliveries": set(gone),
        "on_time": 5.0,
        "ledger_wall": T0,
    }


def test_the_message_model_reconciles():
    entries = [
        entry("a"),
        entry("d", deliver_at=T0 + 3),  # delayed: after "b" in Kafka, outside the key's order
        entry("b", at=2.0),
        entry("x", at=3.0, expires_at=T0 + 5),  # expired, never sent
        entry("y", at=3.0, expires_at=T0 + 5),  # sent before its expiry, unacknowledged
    ]
    events = [
        record(0, "a", (T0 + 1.01) * 1000),
        record(1, "b", (T0 + 2.01) * 1000),
        record(2, "y", (T0 + 3.01) * 1000),
        record(3, "d", (T0 + 3.5) * 1000),
    ]
    effects = [(h, "k", m) for h in ("soak.effect", "soak.flaky") for m in ("a", "b", "y", "d")]
    chained = [Record(0, i, b"k", {"from": m}, f"c-{m}", 0, {}) for i, m in enumerate("abyd")]
    result = reconcile(entries, events, chained, db(effects, expired={"x", "y"}))
    assert result["violations"] == []
    model = result["figures"]["model"]
    assert model["delayed"]["early"] == 0 and model["delayed"]["on_time"] == 1
    assert model["expiring"] == {
        "count": 2,
        "sent": 1,
        "expired": 2,
        "sent_then_expired": 1,
        "sent_late": 0,
        "deliveries_expired": 0,
    }


def test_an_early_delayed_message_and_a_late_send_are_violations():
    entries = [entry("d", deliver_at=T0 + 3), entry("x", expires_at=T0 + 2)]
    events = [record(0, "d", (T0 + 2.5) * 1000), record(1, "x", (T0 + 3.5) * 1000)]
    effects = [(h, "k", m) for h in ("soak.effect", "soak.flaky") for m in ("d", "x")]
    violations = reconcile(entries, events, [], db(effects))["violations"]
    assert any("reached Kafka early" in v for v in violations)
    assert any("sent after their expiry" in v for v in violations)
