"""The results as Markdown."""

from __future__ import annotations

from typing import Any


def _spread(value: dict[str, Any], key: str) -> str:
    """``median (min-max)`` of a repeated figure, or the value alone."""
    if value.get(key) is None:
        return ""
    low, high = value.get(f"{key}_min"), value.get(f"{key}_max")
    return f"{value[key]} ({low}-{high})" if low is not None else f"{value[key]}"


_SHOWN = ("rate", "p50_ms", "p95_ms", "p99_ms", "rss_main_mb", "rss_pool_mb")


def table(results: dict[str, Any]) -> str:
    """The results as Markdown: each figure as median (min-max) of its runs."""
    lines = [
        "| measurement | messages/s | latency p50 / p99 (ms) | RSS main / pool (MB) | notes |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, value in results.items():
        if not isinstance(value, dict) or "rate" not in value or name == "options":
            continue
        lat = ""
        if value.get("p50_ms") is not None:
            lat = f"{_spread(value, 'p50_ms')} / {_spread(value, 'p99_ms')}"
        rss = ""
        if value.get("rss_main_mb") is not None:
            rss = f"{_spread(value, 'rss_main_mb')} / {_spread(value, 'rss_pool_mb')}"
        notes = ", ".join(
            f"{k} {v}"
            for k, v in value.items()
            if k in ("messages", "offered_rate", "written", "received", "handled", "runs")
        )
        lines.append(f"| {name} | {_spread(value, 'rate')} | {lat} | {rss} | {notes} |")
    for key in ("relay_vs_limit", "relay_vs_naive", "scaling_ratio"):
        if key in results:
            r = results[key]
            lines.append(f"| {key} | {r['ratio']} ({r['min']}-{r['max']}) | | | |")
    if "wake_cost" in results:
        lines += ["", "| wake-up cost (pgbench, 32 writers) | value |", "| --- | --- |"]
        for k, v in results["wake_cost"].items():
            lines.append(f"| {k} | {v} |")
    return "\n".join(lines)
