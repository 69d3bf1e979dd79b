"""A secured Kafka: SASL SCRAM-SHA-512, in plain text and over TLS with a CA of its own,
as `scripts/services` starts it. One client configuration (``kafka_config``) reaches the
producer, the consumer and every admin client: publish -> relay -> Kafka -> inbox ->
handler, topic creation, `status`, `health --ready` and the lag gauge all work, and a
client without the password is refused."""

import json
import os
from dataclasses import dataclass, field

import psycopg2
import pytest
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

from outbox_bridge import publish
from outbox_bridge.config import Settings
from outbox_bridge.ops import ensure_topics
from outbox_bridge.tools.soak.reconcile import read_topic
from tests.acceptance.test_observability import free_port, sample, scrape
from tests.acceptance.test_outbox import cli
from tests.conftest import wait_for

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.rabbitmq, pytest.mark.slow]

SECURED_ENV = (
    "OUTBOX_BRIDGE_KAFKA_SASL",
    "OUTBOX_BRIDGE_KAFKA_TLS",
    "OUTBOX_BRIDGE_KAFKA_USER",
    "OUTBOX_BRIDGE_KAFKA_PASSWORD_FILE",
    "OUTBOX_BRIDGE_KAFKA_CA",
)


@dataclass
class Secured:
    bootstrap: str
    config: dict = field(repr=False)  # holds the password

    def settings(self, **config) -> Settings:
        config = {**self.config, **config}
        return Settings(kafka_bootstrap_servers=self.bootstrap, kafka_config=config)

    def env(self, **config) -> dict[str, str]:
        return {
            "OUTBOX_BRIDGE_KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
            "OUTBOX_BRIDGE_KAFKA_CONFIG": json.dumps({**self.config, **config}),
        }


def answers(conf: dict) -> tuple[bool, list[KafkaError]]:
    """Whether a client with ``conf`` gets the cluster's metadata, and the errors it saw."""
    errors: list[KafkaError] = []
    admin = AdminClient({**conf, "socket.timeout.ms": 3000, "error_cb": errors.append})
    try:
        admin.list_topics(timeout=5)
        return True, errors
    except KafkaException:
        admin.poll(1)  # serves error_cb
        return False, errors


@pytest.fixture(params=["SASL_PLAINTEXT", "SASL_SSL"])
def secured(request, services) -> Secured:
    found = {name: os.environ.get(name, "") for name in SECURED_ENV}
    if not all(found.values()):
        reason = "the secured listeners are not configured: run scripts/test (scripts/services env)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    with open(found["OUTBOX_BRIDGE_KAFKA_PASSWORD_FILE"]) as f:
        password = f.read().strip()
    ssl = request.param == "SASL_SSL"
    config = {
        "security.protocol": request.param,
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": found["OUTBOX_BRIDGE_KAFKA_USER"],
        "sasl.password": password,
        **({"ssl.ca.location": found["OUTBOX_BRIDGE_KAFKA_CA"]} if ssl else {}),
    }
    bootstrap = found["OUTBOX_BRIDGE_KAFKA_TLS" if ssl else "OUTBOX_BRIDGE_KAFKA_SASL"]
    secured = Secured(bootstrap, config)
    # the user's credential reaches the broker's metadata a moment after `services up`
    wait_for(
        lambda: answers({"bootstrap.servers": bootstrap, **config})[0],
        30,
        f"the {request.param} listener to accept the user",
    )
    return secured


def test_a_client_without_the_password_is_refused(secured):
    plain = {"bootstrap.servers": secured.bootstrap}
    assert answers({**plain, **secured.config})[0]  # the listener is up and answers
    ok, _ = answers(plain)
    assert not ok, "a client without credentials got metadata"
    ok, errors = answers({**plain, **secured.config, "sasl.password": "not-the-password"})
    assert not ok, "a wrong password got metadata"
    assert any(e.code() == KafkaError._AUTHENTICATION for e in errors), errors
    if secured.config["security.protocol"] == "SASL_SSL":  # the broker's certificate is checked
        # the system's CAs only: they never signed the script's broker certificate
        no_ca = {k: v for k, v in secured.config.items() if k != "ssl.ca.location"}
        assert not answers({**plain, **no_ca})[0], "a certificate from an unknown CA was trusted"


def test_publish_relay_consume_handle_status_health_and_lag_through_the_secured_listener(
    secured, inbox, worker_env, db_url, topic, kafka_admin, tmp_path
):
    settings = secured.settings()
    # topic creation through the secured admin client
    made = topic + "-made"
    ensure_topics(settings, [made])
    assert made in kafka_admin.list_topics(made, timeout=10).topics

    port, metrics_dir = free_port(), tmp_path / "metrics"
    metrics_dir.mkdir()
    env = secured.env()
    inbox.start(
        concurrency=2,
        OUTBOX_BRIDGE_METRICS_PORT=str(port),
        PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
        **env,
    )
    c = psycopg2.connect(db_url)
    with c, c.cursor() as cur:
        ids = [publish(cur, topic, {"k": "a", "seq": i}, key="a") for i in range(5)]
    c.close()
    # the relay's producer and the inbox's consumer both went through the listener
    wait_for(lambda: len(inbox.effects()) == 5, 60, "the handler's writes")
    assert [r[0] for r in inbox.effects()] == ids
    in_kafka = [r[4] for r in read_topic(settings, topic)]
    assert sorted(in_kafka) == sorted(str(i) for i in ids)

    cli_env = {**worker_env, **env}

    def lag_on_topic():
        out = cli(cli_env, "status", "--json")
        assert out.returncode == 0, out.stderr
        entries = [
            p for p in json.loads(out.stdout)["inbox"]["consumer_lag"] if p["topic"] == topic
        ]
        done = sum(p["committed"] or 0 for p in entries) == 5 and not any(p["lag"] for p in entries)
        return done and entries

    status = wait_for(lag_on_topic, 60, "status to show the group's lag on the topic")
    assert sorted(p["partition"] for p in status) == [0, 1, 2, 3]
    ready = cli(cli_env, "health", "--ready")
    assert ready.returncode == 0 and "kafka: answers" in ready.stdout, ready.stdout
    lag = wait_for(
        lambda: (
            (s := scrape(port))
            and "outbox_bridge_consumer_lag{" in "".join(s)
            and sample(s, "outbox_bridge_consumer_lag", topic=topic) == 0
        ),
        60,
        "the sampled consumer lag gauge",
    )
    assert lag
    # the same commands with a wrong password: refused, and said so
    wrong = {**worker_env, **secured.env(**{"sasl.password": "not-the-password"})}
    refused = cli(wrong, "health", "--ready", "--timeout", "3")
    assert refused.returncode == 1 and "kafka: no answer" in refused.stdout, refused.stdout
    assert "not-the-password" not in refused.stdout + refused.stderr
