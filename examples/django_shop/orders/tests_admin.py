"""outbox-bridge's admin views under Django's test runner, against PostgreSQL.

TransactionTestCase: the actions change rows through outbox_bridge.ops on a
connection of their own, as `outbox-bridge dead retry` does, so the rows they act
on must be committed.
"""

import uuid

from django.contrib.auth.models import Permission, User
from django.db import connection, transaction
from django.test import TransactionTestCase

from outbox_bridge import publish

OUTBOX = "/admin/outbox_bridge/outboxmessage/"
DELIVERIES = "/admin/outbox_bridge/delivery/"
INBOX = "/admin/outbox_bridge/inboxmessage/"


def sql(statement, params=()):
    with connection.cursor() as cur:
        cur.execute(statement, params)
        return cur.fetchall() if cur.description else []


class Clean(TransactionTestCase):
    """Django flushes its own tables between these tests; outbox-bridge's are emptied here."""

    def tearDown(self):
        sql(
            "TRUNCATE outbox_bridge.outbox, outbox_bridge.inbox, outbox_bridge.deliveries,"
            " outbox_bridge.handlers"
        )


class Admin(Clean):
    def setUp(self):
        self.admin = User.objects.create_superuser("admin", "a@example.com", "pw")
        with transaction.atomic():
            self.head = publish(connection, "orders", {"n": 1}, key="order-7")
            publish(connection, "orders", {"n": 2}, key="order-7")
            publish(connection, "other", b"\x00\xff", key="k")
        # the head failed for good; the next of its key waits behind it (as the relay
        # leaves them after the last retry)
        sql(
            "UPDATE outbox_bridge.outbox SET state = 'dead', attempts = 6, dead_at = now(),"
            " last_error = 'MSG_SIZE_TOO_LARGE: too large' WHERE message_id = %s",
            (str(self.head),),
        )
        sql("UPDATE outbox_bridge.outbox SET state = 'waiting' WHERE value = '{\"n\":2}'")
        ((self.head_id,),) = sql(
            "SELECT id FROM outbox_bridge.outbox WHERE message_id = %s", (str(self.head),)
        )

    def test_the_outbox_filters_by_state_and_searches_by_key(self):
        self.client.force_login(self.admin)
        dead = self.client.get(OUTBOX, {"state__exact": "dead"}).content.decode()
        self.assertIn("order-7", dead)
        self.assertIn("MSG_SIZE_TOO_LARGE", dead)
        self.assertNotIn('<td class="field-topic">other</td>', dead)
        found = self.client.get(OUTBOX, {"q": "k"}).content.decode()
        self.assertIn("other", found)
        self.assertNotIn("order-7", found)
        by_id = self.client.get(OUTBOX, {"q": str(self.head)}).content.decode()
        self.assertIn("1 result", by_id)

    def test_a_row_shows_its_value_readably_and_cannot_be_edited(self):
        self.client.force_login(self.admin)
        page = self.client.get(f"{OUTBOX}{self.head_id}/change/").content.decode()
        self.assertIn("&quot;n&quot;: 1", page)  # JSON, pretty-printed
        self.assertNotIn('name="_save"', page)
        ((raw,),) = sql("SELECT id FROM outbox_bridge.outbox WHERE topic = 'other'")
        self.assertIn("hex: 00 ff", self.client.get(f"{OUTBOX}{raw}/change/").content.decode())
        self.assertEqual(self.client.post(f"{OUTBOX}{raw}/change/", {}).status_code, 403)
        self.assertEqual(self.client.get(f"{OUTBOX}add/").status_code, 403)

    def test_retry_does_what_dead_retry_does_and_frees_the_key(self):
        self.client.force_login(self.admin)
        response = self.client.post(
            OUTBOX, {"action": "retry_dead", "_selected_action": [self.head_id]}, follow=True
        )
        self.assertContains(response, "Retried 1 dead messages")
        # pending again with its id (its place in the key's order), the next one freed
        states = sql("SELECT id, state, attempts FROM outbox_bridge.outbox ORDER BY id")
        self.assertEqual(states[0], (self.head_id, "pending", 0))
        self.assertEqual([s[1] for s in states], ["pending", "pending", "pending"])

    def test_purge_deletes_the_dead_row_and_frees_the_key(self):
        self.client.force_login(self.admin)
        self.client.post(OUTBOX, {"action": "purge_dead", "_selected_action": [self.head_id]})
        states = sql("SELECT state FROM outbox_bridge.outbox ORDER BY id")
        self.assertEqual(states, [("pending",), ("pending",)])

    def test_an_action_on_a_row_that_is_not_dead_changes_nothing(self):
        self.client.force_login(self.admin)
        ((pending,),) = sql("SELECT id FROM outbox_bridge.outbox WHERE topic = 'other'")
        response = self.client.post(
            OUTBOX, {"action": "purge_dead", "_selected_action": [pending]}, follow=True
        )
        self.assertContains(response, "No dead messages were selected")
        self.assertEqual(len(sql("SELECT 1 FROM outbox_bridge.outbox")), 3)

    def test_a_user_who_may_only_view_sees_the_rows_but_cannot_retry(self):
        viewer = User.objects.create_user("viewer", password="pw", is_staff=True)
        viewer.user_permissions.add(Permission.objects.get(codename="view_outboxmessage"))
        self.client.force_login(viewer)
        page = self.client.get(OUTBOX)
        self.assertEqual(page.status_code, 200)
        self.assertNotIn("retry_dead", page.content.decode())
        self.client.post(OUTBOX, {"action": "retry_dead", "_selected_action": [self.head_id]})
        self.assertEqual(
            sql("SELECT state FROM outbox_bridge.outbox WHERE id = %s", (self.head_id,)),
            [("dead",)],
        )
        stranger = User.objects.create_user("stranger", password="pw", is_staff=True)
        self.client.force_login(stranger)
        self.assertEqual(self.client.get(OUTBOX).status_code, 403)


class InboxAdmin(Clean):
    def setUp(self):
        self.admin = User.objects.create_superuser("admin", "a@example.com", "pw")
        self.message_id = uuid.uuid4()
        sql(
            'INSERT INTO outbox_bridge.inbox (message_id, topic, "partition", "offset", key,'
            " value, headers) VALUES (%s, 'orders', 0, 7, 'order-7', '{\"n\": 1}', '[]')",
            (str(self.message_id),),
        )
        for handler, state in (("shop.ship", "dead"), ("shop.bill", "done")):
            sql(
                "INSERT INTO outbox_bridge.handlers (name, topic) VALUES (%s, 'orders')", (handler,)
            )
            sql(
                "INSERT INTO outbox_bridge.deliveries (message_id, handler, topic, key, shard,"
                " state, attempts, last_error) VALUES (%s, %s, 'orders', 'order-7', 3, %s, 4,"
                " CASE WHEN %s = 'dead' THEN 'RuntimeError: no stock' END)",
                (str(self.message_id), handler, state, state),
            )

    def test_deliveries_filter_by_handler_and_retry_per_handler(self):
        self.client.force_login(self.admin)
        everything = self.client.get(DELIVERIES).content.decode()
        # the filter's choices: the registered handlers and their topics
        self.assertIn("?handler=shop.ship", everything)
        self.assertIn("?topic=orders", everything)
        page = self.client.get(DELIVERIES, {"handler": "shop.ship"}).content.decode()
        self.assertIn("no stock", page)
        self.assertNotIn("shop.bill", page.split("changelist-form")[1])
        ((dead,),) = sql("SELECT id FROM outbox_bridge.deliveries WHERE state = 'dead'")
        response = self.client.post(
            DELIVERIES, {"action": "retry_dead", "_selected_action": [dead]}, follow=True
        )
        self.assertContains(response, "Retried 1 dead deliveries")
        self.assertEqual(
            sql("SELECT handler, state FROM outbox_bridge.deliveries ORDER BY handler"),
            [("shop.bill", "done"), ("shop.ship", "pending")],
        )

    def test_an_inbox_message_shows_its_deliveries(self):
        self.client.force_login(self.admin)
        ((row,),) = sql("SELECT id FROM outbox_bridge.inbox")
        page = self.client.get(f"{INBOX}{row}/change/").content.decode()
        self.assertIn("shop.ship", page)
        self.assertIn("no stock", page)
        self.assertIn("&quot;n&quot;: 1", page)
