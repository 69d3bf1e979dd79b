"""The Django admin in a real browser: headless Chromium (Debian's) driven by Selenium
logs in to the example shop's admin, filters the dead outbox messages, retries one,
and a real worker delivers it to Kafka.

The message died for a real reason: it was larger than its topic's max.message.bytes.
The operator raises the topic's limit, then retries it from the admin.
"""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource

from tests.conftest import ROOT, query, wait_for

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.rabbitmq, pytest.mark.slow]

SHOP = ROOT / "examples" / "django_shop"
# where to keep the screenshot, to refresh the README's (docs/admin-dead.png)
SCREENSHOT_DIR = os.environ.get("OUTBOX_BRIDGE_SCREENSHOT_DIR")


def _browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        reason = "Chromium and chromedriver are not installed (scripts/browser installs them)"
        if os.environ.get("OUTBOX_BRIDGE_BROWSER_REQUIRED") or os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1400,900",
    ):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _manage(env: dict, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=SHOP,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.fixture
def shop(db_url, services, tmp_path):
    """The example shop on this test's database, served by runserver: its URL."""
    from psycopg2.extensions import parse_dsn

    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_BRIDGE_")},
        "DATABASE_URL": services["OUTBOX_BRIDGE_DATABASE_URL"],
        "SHOP_DATABASE_NAME": parse_dsn(db_url)["dbname"],
        "PYTHONPATH": str(ROOT),
        "DJANGO_SUPERUSER_PASSWORD": "admin-pw",
    }
    _manage(env, "migrate", "--noinput")
    _manage(
        env, "createsuperuser", "--noinput", "--username", "admin", "--email", "admin@example.com"
    )
    port = _free_port()
    log = open(tmp_path / "runserver.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [sys.executable, "manage.py", "runserver", f"127.0.0.1:{port}", "--noreload", "--insecure"],
        cwd=SHOP,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )

    def up() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    try:
        wait_for(up, 60, "the shop's runserver")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(20)
        log.close()


@pytest.mark.kafka_topic(config={"max.message.bytes": "2000"})
def test_an_operator_retries_a_dead_message_from_the_admin_and_it_is_delivered(
    shop, start_worker, db_url, topic, kafka_admin, kafka_reader, tmp_path
):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from tests.acceptance.test_message_model import in_tx

    start_worker(OUTBOX_BRIDGE_MAX_RETRIES="1", OUTBOX_BRIDGE_RETRY_BACKOFF_MAX="1")
    (big,) = in_tx(db_url, (topic, {"order": 7, "pad": "x" * 5000}, {"key": "order-7"}))
    wait_for(
        lambda: query(db_url, "SELECT state FROM outbox_bridge.outbox") == [("dead",)],
        60,
        "the message to be dead (too large for its topic)",
    )
    ((error,),) = query(db_url, "SELECT last_error FROM outbox_bridge.outbox")
    assert "MSG_SIZE_TOO_LARGE" in error
    # the operator's fix: the topic takes larger messages now
    raised = ConfigResource(
        ConfigResource.Type.TOPIC,
        topic,
        incremental_configs=[
            ConfigEntry("max.message.bytes", "1000000", incremental_operation=AlterConfigOpType.SET)
        ],
    )
    for future in kafka_admin.incremental_alter_configs([raised]).values():
        future.result(30)

    browser = _browser()
    try:
        browser.get(f"{shop}/admin/login/?next=/admin/outbox_bridge/outboxmessage/")
        browser.find_element(By.NAME, "username").send_keys("admin")
        browser.find_element(By.NAME, "password").send_keys("admin-pw")
        browser.find_element(By.CSS_SELECTOR, "input[type=submit], button[type=submit]").click()
        wait_for(lambda: "Select outbox message" in browser.title, 30, "the outbox list")
        browser.find_element(By.LINK_TEXT, "dead").click()  # the state filter
        wait_for(lambda: "state__exact=dead" in browser.current_url, 30, "the dead filter")
        rows = browser.find_elements(By.CSS_SELECTOR, "#result_list tbody tr")
        assert len(rows) == 1 and "MSG_SIZE_TOO_LARGE" in rows[0].text
        shot = tmp_path / "admin-dead.png"
        browser.save_screenshot(str(shot))
        if SCREENSHOT_DIR:
            shutil.copy(shot, Path(SCREENSHOT_DIR) / "admin-dead.png")
        rows[0].find_element(By.CSS_SELECTOR, "input.action-select").click()
        Select(browser.find_element(By.NAME, "action")).select_by_value("retry_dead")
        browser.find_element(By.CSS_SELECTOR, "button[name=index]").click()
        wait_for(
            lambda: "Retried 1 dead messages" in browser.page_source, 30, "the action's message"
        )
    finally:
        browser.quit()

    (sent,) = kafka_reader(topic).read(1, timeout=60)
    assert dict(sent.headers())["message_id"].decode() == str(big)
    wait_for(
        lambda: query(db_url, "SELECT count(*) FROM outbox_bridge.outbox") == [(0,)],
        30,
        "the delivered message to be deleted",
    )
