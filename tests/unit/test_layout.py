"""The package's layout: what may import what (every import counts, also those
inside functions), and what a publishing process loads."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "outbox_bridge"
CORE = {
    "config",
    "errors",
    "message",
    "db",
    "migrate",
    "events",
    "queue",
    "shardtask",
    "watchdog",
    "queries",
}
SIDES = ("outbox", "inbox")
ROOT = "outbox_bridge"  # the package's own __init__


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if "migrations" not in parts:
            found[".".join(parts) or ROOT] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``name`` imports, anywhere in its text. ``from . import
    x`` counts as importing the package too (Python runs its ``__init__`` first)."""
    dotted = "" if name == ROOT else name
    package = dotted.split(".") if path.name == "__init__.py" else dotted.split(".")[:-1]
    package = [p for p in package if p]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                base = ".".join([*base, node.module] if node.module else base)
            elif (node.module or "").startswith("outbox_bridge"):
                base = node.module.removeprefix("outbox_bridge").lstrip(".")
            else:
                continue
            targets = [f"{base}.{a.name}".strip(".") for a in node.names] + [base]
        elif isinstance(node, ast.Import):
            targets = [
                a.name.removeprefix("outbox_bridge").lstrip(".")
                for a in node.names
                if a.name.startswith("outbox_bridge")
            ]
        for target in targets:
            # the deepest known module named: "x.y import z" is x.y.z when that is a module
            while target and target not in known:
                target = target.rpartition(".")[0]
            target = target or ROOT
            if target != name:
                out.add(target)
    return out


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imports(name, path, known) for name, path in found.items()}


def test_there_is_no_import_circle():
    edges = graph()
    circles = []

    def visit(node: str, trail: list[str]) -> None:
        for nxt in sorted(edges.get(node, ())):
            if nxt in trail:
                circles.append(trail[trail.index(nxt) :] + [nxt])
            elif nxt not in done:
                visit(nxt, [*trail, nxt])
        done.add(node)

    done: set[str] = set()
    for start in sorted(edges):
        if start not in done:
            visit(start, [start])
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_the_core_imports_nothing_from_the_sides_the_worker_the_commands_or_contrib():
    edges = graph()
    for name in CORE & set(edges):
        outside = {m for m in edges[name] if m.split(".")[0] not in CORE}
        assert not outside, f"core module {name} imports {sorted(outside)}"


def test_the_two_sides_never_import_each_other():
    edges = graph()
    for name, targets in edges.items():
        side = name.split(".")[0]
        if side in SIDES:
            other = {t for t in targets if t.split(".")[0] in SIDES and t.split(".")[0] != side}
            assert not other, f"{name} imports {sorted(other)} from the other side"


def test_publishing_builds_no_celery_app_and_reads_no_celeryconfig(tmp_path):
    # a celeryconfig that says so when it is read
    (tmp_path / "celeryconfig.py").write_text("import sys\nsys.modules['read_it'] = sys\n")
    code = (
        "import sys\n"
        "def loaded():\n"
        "    return sorted(m for m in sys.modules if m == 'celery' or m.startswith('celery.')\n"
        "                  or m.startswith('outbox_bridge.worker') or m == 'read_it')\n"
        "import outbox_bridge\n"
        "from outbox_bridge import publish, send, publish_async, Message\n"
        "print(loaded())\n"
        "from outbox_bridge import events\n"
        "events.publishing([])  # what publish() asks the middleware\n"
        "print(loaded())\n"
    )
    env = {"PYTHONPATH": f"{tmp_path}:{PACKAGE.parent}", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    imported, published = out.stdout.splitlines()
    assert imported == "[]"  # importing reads nothing
    # publishing reads the settings from celeryconfig, and builds no Celery app
    assert published == "['read_it']"


def test_the_worker_app_is_still_what_celery_dash_a_finds():
    code = (
        "import outbox_bridge\n"
        "from celery import Celery\n"
        "assert isinstance(outbox_bridge.app, Celery)\n"
        "outbox_bridge.app.loader.import_default_modules()\n"
        "print(sorted(t for t in outbox_bridge.app.tasks if t.startswith('outbox_bridge')))\n"
    )
    env = {"PYTHONPATH": str(PACKAGE.parent), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    # task names are strings in messages already queued: they must not move with modules
    assert "outbox_bridge.outbox.publish" in out.stdout
    assert "outbox_bridge.outbox.retry" in out.stdout


RUNTIME_SKIP = ("tools", "contrib.django.migrations")
TABLE_SQL = re.compile(r"\b(INSERT INTO|UPDATE|DELETE FROM|FROM|JOIN)\s+\{\w+\}")


def test_every_statement_on_our_tables_is_named_in_the_sql_files():
    inline = []
    for name, path in modules().items():
        if name.startswith(RUNTIME_SKIP):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            text = node.value if isinstance(node, ast.Constant) else None
            if isinstance(text, str) and TABLE_SQL.search(text):
                inline.append(f"{name}:{node.lineno}")
    assert not inline, f"SQL on outbox-bridge's tables outside sql/queries: {inline}"


def test_every_named_statement_renders_and_is_used():
    from outbox_bridge import queries

    code = "\n".join(
        path.read_text() for name, path in modules().items() if not name.startswith("tools")
    )
    unused = []
    for name in queries.statements():
        area, _, short = name.partition(".")
        queue_use = area == "queue" and (f'"{short}"' in code or f"queue.{short}" in code)
        # a name made in an f-string: f"ops.dead_{table}"
        prefix = name.rsplit("_", 1)[0] + "_"
        built = "_" in name and (f"{prefix}{{" in code or f'"{prefix}"' in code)
        if f'"{name}"' not in code and not built and not queue_use:
            unused.append(name)
    assert not unused, f"statements no code names: {unused}"
