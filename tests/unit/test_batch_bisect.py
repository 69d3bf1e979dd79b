"""How a batch handler's failure is found (``inbox.handlers._in_savepoint``): the list is
halved in savepoints until the failing messages stand alone. The same behaviour runs
against the real services in tests/acceptance/test_batch_handlers.py."""

import uuid
from types import SimpleNamespace

from outbox_bridge.inbox.handlers import HandlerSpec, _Handled, _in_savepoint
from outbox_bridge.message import JSONSerializer, Message
from outbox_bridge.shardtask import HeldKeys


class Cursor:
    def __init__(self):
        self.statements = []

    def execute(self, sql, params=None):
        self.statements.append(sql)


def _run(messages, bad):
    calls = []

    def handler(batch, tx):
        calls.append([m.value for m in batch])
        if any(m.value in bad for m in batch):
            raise RuntimeError("bad message")

    spec = HandlerSpec("t", SimpleNamespace(name="h"), handler, JSONSerializer(), batch=True)
    out, held = _Handled(), HeldKeys()
    items = [(i, m) for i, m in enumerate(messages)]
    _in_savepoint(Cursor(), SimpleNamespace(name="h"), spec, items, out, held)
    return out, calls


def _messages(keys):
    return [Message(uuid.uuid4(), "t", k and k.encode(), n) for n, k in enumerate(keys)]


def test_one_bad_message_in_a_thousand_costs_about_two_log2_calls_and_fails_alone():
    out, calls = _run(_messages([f"k{n % 50}" for n in range(1000)]), bad={617})
    assert out.failed.keys() == {617}
    assert [617] in calls  # it failed in a call of its own
    assert len(calls) <= 2 * 10 + 1  # log2(1000) < 10 halvings, two calls each
    # the later messages of its key (k17: 667, 717, ...) wait; every other one is done
    waiting = {n for n in range(1000) if n % 50 == 17 and n > 617}
    assert set(out.done) == set(range(1000)) - {617} - waiting


def test_a_key_after_its_failed_message_is_never_called_and_keyless_ones_go_on():
    # key a: 0 ok, 1 bad, 2 must wait; keyless 3 and key b 4 go on
    out, calls = _run(_messages(["a", "a", "a", None, "b"]), bad={1})
    assert out.failed.keys() == {1}
    assert sorted(out.done) == [0, 3, 4]
    after = calls[calls.index([1]) + 1 :]
    assert all(2 not in c for c in after)  # halves after the failure skip the held key


def test_messages_done_in_order_and_each_committed_call_once():
    out, calls = _run(_messages(["a", "b", "a", "b", "c", "c", "a", "b"]), bad={5})
    assert out.failed.keys() == {5}
    assert out.done == sorted(out.done)  # in delivery order
    succeeded = [c for c in calls if 5 not in c]
    done_in_calls = [n for c in succeeded for n in c]
    assert sorted(done_in_calls) == sorted(out.done)  # each done message in one kept call
