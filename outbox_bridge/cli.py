"""The ``outbox-bridge`` command (also ``celery outbox-bridge``)."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from typing import Any

import click

from . import ops
from .config import get_settings
from .migrate import migrate as run_migrations


def _emit(data: Any, as_json: bool, text: str) -> None:
    click.echo(json.dumps(data, indent=2, default=str) if as_json else text)


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log at INFO level.")
def main(verbose: bool) -> None:
    """outbox-bridge: transactional outbox and inbox for PostgreSQL, Kafka and Celery."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@main.command()
@click.option("--check", is_flag=True, help="Apply nothing; exit 1 if migrations are pending.")
@click.option("--sql", "as_sql", is_flag=True, help="Print every migration as SQL; apply nothing.")
def migrate(check: bool, as_sql: bool) -> None:
    """Apply the schema migrations (idempotent)."""
    from .migrate import pending, script

    if as_sql:
        click.echo(script(get_settings().schema), nl=False)
        return
    if check:
        missing = pending(get_settings())
        click.echo("pending: " + ", ".join(missing) if missing else "schema is up to date")
        sys.exit(1 if missing else 0)
    applied = run_migrations(get_settings())
    click.echo("applied: " + ", ".join(applied) if applied else "schema is up to date")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--no-kafka", is_flag=True, help="Skip the consumer lag (no Kafka request).")
def status(as_json: bool, no_kafka: bool) -> None:
    """Counts per state, oldest pending age, blocked keys and consumer lag."""
    data = ops.status(get_settings(), kafka=not no_kafka)
    _emit(data, as_json, "\n".join(_status_lines(data)))


def _status_lines(data: dict) -> list[str]:
    def queue_lines(name: str, q: dict) -> list[str]:
        lines = [f"{name}: " + ", ".join(f"{k} {v}" for k, v in q["counts"].items())]
        age = q.get("oldest_pending_seconds")
        lines.append(f"  oldest pending: {'-' if age is None else f'{age:.1f}s'}")
        if q.get("next_due_seconds") is not None:
            lines.append(f"  next delayed message due in {max(0.0, q['next_due_seconds']):.1f}s")
        for b in q.get("blocked_keys", []):
            lines.append(
                f"  blocked key {b['topic']}/{b['key']}: head {b['state']} after"
                f" {b['attempts']} attempts, {b['waiting']} waiting ({b['last_error']})"
            )
        return lines

    who = data.get("dispatcher")
    lines = [
        "dispatcher: none elected (no worker with its watcher is connected)"
        if who is None
        else f"dispatcher: the worker with pid {who['pid']} on {who['host']}"
    ]
    lines += queue_lines("outbox", data["outbox"])
    for handler, entry in data["inbox"]["handlers"].items():
        lines += queue_lines(f"inbox {handler}", entry)
    for p in data["inbox"].get("consumer_lag", []):
        lines.append(
            f"consumer lag {p['topic']}[{p['partition']}]: {p['lag']}"
            f" (committed {p['committed']}, end {p['end']})"
        )
    return lines


@main.group()
def dead() -> None:
    """List, retry or purge dead messages."""


def _filters(f):
    f = click.option("--topic", help="Only this topic.")(f)
    f = click.option("--key", help="Only this key.")(f)
    f = click.option("--id", "ids", multiple=True, help="Only this row id or message id.")(f)
    f = click.option("--handler", help="Only deliveries to this handler (task name).")(f)
    return f


@dead.command("list")
@_filters
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def dead_list(topic, key, ids, handler, as_json) -> None:
    """Dead outbox messages and inbox deliveries, with their last error."""
    rows = ops.dead_list(get_settings(), topic, key, ids, handler)
    text = "\n".join(
        f"{r['queue']} {r['id']} {r['message_id']} {r['topic']}/{r['key']}"
        f" {r['state']} attempts={r['attempts']}"
        f" dead_at={r['dead_at'] and r['dead_at'].strftime('%Y-%m-%d %H:%M:%S')}"
        f" {r['last_error']}"
        for r in rows
    )
    _emit(rows, as_json, text or "no dead messages")


@dead.command("retry")
@_filters
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def dead_retry(topic, key, ids, handler, as_json) -> None:
    """Send dead messages (and re-run dead deliveries) again, in their original order.

    Expired messages are left as they are: purge them, or publish them again."""
    count = ops.dead_retry(get_settings(), topic, key, ids, handler)
    _emit({"retried": count}, as_json, f"retried {count} dead messages")


@dead.command("purge")
@_filters
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def dead_purge(topic, key, ids, handler, as_json) -> None:
    """Delete dead messages and deliveries for good (unblocks their keys)."""
    count = ops.dead_purge(get_settings(), topic, key, ids, handler)
    _emit({"purged": count}, as_json, f"purged {count} dead messages")


@main.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def handlers(ctx, as_json: bool) -> None:
    """The handlers registered in the database (each worker registers its own at start)."""
    if ctx.invoked_subcommand:
        return
    found = ops.list_handlers(get_settings())
    text = "\n".join(
        f"{h['name']} on {h['topic']}: max_retries={h['max_retries']},"
        f" {h['open_deliveries']} open deliveries, registered {h['registered_at']:%Y-%m-%d %H:%M},"
        f" last seen {h['seen_at']:%Y-%m-%d %H:%M}"
        for h in found
    )
    _emit(found, as_json, text or "no handlers registered")


@handlers.command("forget")
@click.argument("name")
def handlers_forget(name: str) -> None:
    """Unregister a handler no worker runs any more, and drop its open deliveries."""
    try:
        dropped = ops.forget_handler(get_settings(), name)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"forgot {name} and {dropped} open deliveries")


@main.group()
def inbox() -> None:
    """Inbox housekeeping."""


@inbox.command("prune")
@click.option(
    "--older-than",
    "days",
    type=float,
    default=None,
    help="Days since the message was received [default: outbox_bridge_dedupe_window].",
)
def inbox_prune(days: float | None) -> None:
    """Delete handled inbox messages (and their done deliveries) older than the cut-off.

    The worker does this by itself every outbox_bridge_prune_interval seconds. The
    inbox is what deduplicates: keep it longer than any replay of the topics."""
    settings = get_settings()
    count = ops.prune_inbox(settings, settings.dedupe_window if days is None else days * 86400)
    click.echo(f"pruned {count} inbox messages")


@main.command()
@click.option("--live", "mode", flag_value="live", help="This worker's loops are alive.")
@click.option(
    "--ready", "mode", flag_value="ready", help="The database (schema up to date) and Kafka answer."
)
@click.option(
    "--max-age",
    default=60.0,
    show_default=True,
    help="--live: seconds since a loop's last beat that count as alive.",
)
@click.option("--timeout", default=5.0, show_default=True, help="--ready: seconds per check.")
def health(mode: str | None, max_age: float, timeout: float) -> None:
    """Probes for orchestrators: exit 0 when healthy, 1 when not (a line per check)."""
    from .worker import health as probes

    if mode is None:
        raise click.UsageError("say --live or --ready")
    settings = get_settings()
    ok, lines = (
        probes.live(settings, max_age) if mode == "live" else probes.ready(settings, timeout)
    )
    click.echo("\n".join(lines))
    sys.exit(0 if ok else 1)


@main.command()
@click.option("--port", default=9808, show_default=True, help="Port of /metrics.")
@click.option("--address", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--once", is_flag=True, help="Print one scrape and exit.")
def metrics(port: int, address: str, once: bool) -> None:
    """Serve the Prometheus metrics read from the database (and the worker's counters
    when PROMETHEUS_MULTIPROC_DIR names its directory) on their own."""
    try:
        from prometheus_client import generate_latest
    except ImportError:
        raise click.ClickException("pip install outbox-bridge[metrics]") from None
    from .contrib import metrics as found

    settings = get_settings()
    if once:
        click.echo(generate_latest(found.registry(settings)).decode(), nl=False)
        return
    server = found.serve(settings, port, address)
    click.echo(f"metrics on http://{address}:{port}/metrics")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.shutdown()


@main.command()
def watch() -> None:
    """Run the dispatcher (the outbox watcher) in the foreground (Ctrl-C stops it)."""
    from .worker.app import app
    from .worker.dispatcher import Dispatcher

    logging.getLogger().setLevel(logging.INFO)
    app.loader.import_default_modules()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    Dispatcher(app, get_settings()).run(stop)


@main.command()
@click.option("--count", default=300, show_default=True, help="Orders to write.")
@click.option("--topic", default="demo.orders", show_default=True)
def demo(count: int, topic: str) -> None:
    """Sample orders through the outbox, Kafka and a handler (needs a worker that includes
    outbox_bridge.tools.demo.handlers, as scripts/up starts)."""
    from .tools.demo import run_demo

    settings = get_settings()
    run_migrations(settings)
    if run_demo(settings, count, topic):
        raise click.ClickException(
            "not every order was shipped: is a worker with"
            " outbox_bridge.tools.demo.handlers running?"
        )


@main.command()
def consume() -> None:
    """Run the Kafka inbox consumer in the foreground (Ctrl-C stops it)."""
    from .inbox.consumer import InboxConsumer
    from .inbox.handlers import handler_rows
    from .worker.app import app

    logging.getLogger().setLevel(logging.INFO)
    app.loader.import_default_modules()
    rows = handler_rows()
    if not rows:
        raise click.ClickException("no @outbox_handler found in the app's imports / include")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    InboxConsumer(get_settings(), rows).run(stop)


@main.command()
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write JSON here.")
@click.option("--count", default=200_000, show_default=True, help="Messages for limit and backlog.")
@click.option("--size", default=1024, show_default=True, help="Value size in bytes.")
@click.option("--keys", default=100, show_default=True, help="Distinct keys.")
@click.option("--rate", default=1000, show_default=True, help="Offered rate of the steady state.")
@click.option("--seconds", default=20.0, show_default=True, help="Steady-state duration.")
@click.option("--e2e-count", default=50_000, show_default=True, help="Messages end to end.")
@click.option(
    "--e2e-batch-count",
    default=200_000,
    show_default=True,
    help="Messages end to end into the batch handler.",
)
@click.option(
    "--delayed-count",
    default=10_000,
    show_default=True,
    help="Delayed messages due within one second (their lateness).",
)
@click.option(
    "--scale",
    default="10000,1000000",
    show_default=True,
    help="Backlog sizes of the scaling runs, comma-separated.",
)
@click.option("--only", help="Comma-separated measurements to run (default: all).")
@click.option(
    "--repeat",
    default=3,
    show_default=True,
    help="Runs of each figure (median, min and max are reported).",
)
@click.option("--concurrency", default=2, show_default=True, help="-c of the bench worker.")
def bench(
    json_path,
    count,
    size,
    keys,
    rate,
    seconds,
    e2e_count,
    e2e_batch_count,
    delayed_count,
    scale,
    only,
    repeat,
    concurrency,
) -> None:
    """Measure the relay beside the raw Kafka producer (see docs/benchmarks.md)."""
    from .tools.bench import Bench, Options, table

    options = Options(
        count=count,
        size=size,
        keys=keys,
        rate=rate,
        seconds=seconds,
        e2e_count=e2e_count,
        e2e_batch_count=e2e_batch_count,
        delayed_count=delayed_count,
        scale_rows=tuple(int(n) for n in scale.split(",") if n),
        repeat=repeat,
        concurrency=concurrency,
    )
    results = Bench(get_settings(), options).run(set(only.split(",")) if only else None)
    click.echo(table(results))
    click.echo(f"machine: {results['machine']}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=2, default=str)


@main.command()
@click.option("--seconds", default=60.0, show_default=True, help="Seconds of traffic.")
@click.option("--rate", default=100.0, show_default=True, help="Messages/s, all writers.")
@click.option("--writers", default=4, show_default=True, help="Writer threads.")
@click.option("--workers", default=2, show_default=True, help="Worker processes (>= 2).")
@click.option("--concurrency", default=2, show_default=True, help="-c of each worker.")
@click.option(
    "--pool", default="prefork", show_default=True, help="Celery pool: prefork, threads, gevent."
)
@click.option(
    "--adapter",
    default="psycopg2",
    show_default=True,
    help="How writers publish: psycopg2, psycopg, sqlalchemy, django, asyncpg, psycopg-async.",
)
@click.option("--faults", default=6, show_default=True, help="Faults to inject.")
@click.option(
    "--kinds",
    default="",
    help="Fault kinds, taken in turn (default: kill_child, kill_worker, kafka, postgres,"
    " rabbitmq, rebalance, blackhole_postgres, blackhole_kafka; with --cluster: kafka and"
    " blackhole_kafka give way to kill_dispatcher, broker_leader, broker_controller,"
    " broker_isr).",
)
@click.option(
    "--cluster",
    is_flag=True,
    help="Run on the three-broker cluster (scripts/services up kafka-cluster).",
)
@click.option(
    "--silence",
    default=60.0,
    show_default=True,
    help="Seconds a blackhole fault keeps PostgreSQL or Kafka silent.",
)
@click.option(
    "--sample-every",
    default=60.0,
    show_default=True,
    help="Seconds between samples of memory, files, connections, sizes and lag.",
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False),
    help="Also draw the samples into this PNG (needs matplotlib: the [soak] extra).",
)
@click.option("--seed", default=1, show_default=True, help="Same seed, same schedule.")
@click.option("--poison", default=2, show_default=True, help="Messages a handler always fails.")
@click.option("--delayed-rate", default=0.05, show_default=True, help="Share of delayed messages.")
@click.option(
    "--expiring-rate", default=0.05, show_default=True, help="Share of expiring messages."
)
@click.option(
    "--reply-rate", default=0.05, show_default=True, help="Share of messages asking a reply."
)
@click.option(
    "--on-time",
    default=5.0,
    show_default=True,
    help="Seconds after deliver_at within which a delayed message counts as on time.",
)
@click.option(
    "--fail-rate",
    default=0.2,
    show_default=True,
    help="Share of soak.flaky's attempts that fail (then retried).",
)
@click.option(
    "--rollback-rate",
    default=0.1,
    show_default=True,
    help="Share of writers' transactions rolled back on purpose.",
)
@click.option("--keyless-rate", default=0.1, show_default=True, help="Share without a key.")
@click.option(
    "--max-tail",
    default=120.0,
    show_default=True,
    help="Seconds from the last write or fault to drained, at most.",
)
@click.option(
    "--services",
    default="scripts/services",
    show_default=True,
    help="The script that kills and restarts the services.",
)
@click.option("--logdir", default="soak-logs", show_default=True, help="Ledger and logs.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write JSON here.")
def soak(json_path, kinds, logdir, plot_path, **options) -> None:
    """Traffic through the whole pipeline under faults, reconciled against a ledger."""
    from pathlib import Path

    from .tools.soak import Options, Soak, summary

    opts = Options(
        kinds=tuple(k for k in kinds.split(",") if k),
        logdir=Path(logdir),
        plot=Path(plot_path) if plot_path else None,
        **options,
    )
    try:
        result = Soak(get_settings(), opts).run()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    click.echo(summary(result))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2, default=str)
    if result["violations"]:
        sys.exit(1)


celery_command = main
