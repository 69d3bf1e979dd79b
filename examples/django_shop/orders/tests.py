"""Run by Django's own test runner (python manage.py test), against PostgreSQL."""

from django.db import connection, transaction
from django.test import TestCase, TransactionTestCase
from psycopg2.extensions import parse_dsn

from outbox_bridge import MessageTooLarge, NotInTransaction, publish
from outbox_bridge.config import get_settings
from outbox_bridge.migrate import available, migrate

from .models import Order


def outbox():
    with connection.cursor() as cur:
        cur.execute(
            "SELECT topic, convert_from(key, 'UTF8'), convert_from(value, 'UTF8'), headers::text"
            " FROM outbox_bridge.outbox ORDER BY id"
        )
        return cur.fetchall()


class CreateOrder(TestCase):
    def test_the_order_and_its_message_commit_together(self):
        response = self.client.post("/orders", {"total": "9.90"})
        self.assertEqual(response.status_code, 201)
        order = Order.objects.get()
        self.assertEqual(
            outbox(),
            [
                (
                    "orders",
                    f"order-{order.id}",
                    f'{{"id":{order.id},"total":"9.90"}}',
                    '[["type", "OrderCreated"]]',
                )
            ],
        )

    def test_a_rolled_back_order_sends_nothing(self):
        with self.assertRaises(RuntimeError), transaction.atomic():
            Order.objects.create(total="1.00")
            publish(connection, "orders", {"id": 1})
            raise RuntimeError("payment declined")
        self.assertEqual((Order.objects.count(), outbox()), (0, []))

    def test_bad_input_names_the_problem_and_the_transaction_goes_on(self):
        with transaction.atomic():
            # over OUTBOX_BRIDGE_MAX_MESSAGE_BYTES of settings.py (the default is 1 MB)
            with self.assertRaisesMessage(MessageTooLarge, "max_message_bytes (100000)"):
                publish(connection.cursor(), "orders", "x" * 200_000)
            Order.objects.create(total="2.00")
        self.assertEqual((Order.objects.count(), outbox()), (1, []))

    def test_migrate_applied_outbox_bridges_versioned_sql(self):
        with connection.cursor() as cur:
            cur.execute("SELECT version FROM outbox_bridge.migrations ORDER BY version")
            self.assertEqual([v for (v,) in cur.fetchall()], [v for v, _n, _sql in available()])

    def test_outbox_bridge_migrate_finds_nothing_left_to_do(self):
        # its settings come from Django's: the database is the test database
        database = parse_dsn(get_settings().database_url)["dbname"]
        self.assertTrue(database.startswith("test_"), database)
        self.assertEqual(migrate(), [])


class OutsideAtomic(TransactionTestCase):
    def test_publish_outside_atomic_is_refused(self):
        with self.assertRaisesMessage(NotInTransaction, "transaction.atomic()"):
            publish(connection, "orders", {"id": 1})
        self.assertEqual(outbox(), [])
