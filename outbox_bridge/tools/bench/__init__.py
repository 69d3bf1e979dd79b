"""``outbox-bridge bench``: the relay measured beside the raw Kafka producer.

Everything runs against the same services, in one run, with the same message
size and keys: the raw producer (the limit), a one-row-at-a-time relay (the
naive outbox), the relay draining a backlog, the relay at a steady offered
rate, end to end into a handler, the lateness of delayed messages due together,
the cost of the NOTIFY wake-up for writers, and the drain rate at two table sizes.

The harness is ``harness``; each family of figures is a module (``relay``,
``inbox``, ``costs``); ``report`` renders them.
"""

from __future__ import annotations

import statistics
from typing import Any

from .costs import CostFigures
from .drivers import compare as compare_drivers
from .fleet import FleetFigures
from .harness import Options, combine, say
from .inbox import InboxFigures
from .relay import RelayFigures
from .report import table

__all__ = ["Bench", "Options", "table"]


class Bench(RelayFigures, InboxFigures, CostFigures, FleetFigures):
    """Every figure of ``outbox-bridge bench``, round by round."""

    def run(self, only: set[str] | None = None) -> dict[str, Any]:
        self.fresh_database()
        repeated = [
            ("limit", self.limit),
            ("naive", self.naive),
            ("relay_backlog", lambda: self.drain(self.opts.count, False, "relay_backlog")),
            ("relay_steady", self.steady),
            ("handler_steady", self.handler_steady),
            ("end_to_end", self.end_to_end),
            ("end_to_end_batch", self.end_to_end_batch),
            ("delayed", self.delayed),
        ]
        for rows in self.opts.scale_rows:
            repeated.append(
                (f"scaling_{rows}", lambda rows=rows: self.drain(rows, True, f"scaling_{rows}"))
            )
        once = [
            ("metrics_scrape", self.metrics_scrape),
            ("prune_cost", self.prune_cost),
            ("retention_steady", self.retention_steady),
            ("wake_cost", self.wake_cost),
            ("fleet_capacity", self.fleet_capacity),
            ("idle_fleet", self.idle_fleet),
            ("drivers", lambda: compare_drivers(self.settings, size=self.opts.size)),
        ]
        self.samples: dict[str, list[dict[str, Any]]] = {}
        # round by round, so that each round has every figure (ratios within a round)
        for round_ in range(self.opts.repeat):
            for name, step in repeated:
                if only and name not in only:
                    continue
                say(f"[round {round_ + 1}/{self.opts.repeat}]")
                self.samples.setdefault(name, []).append(step())
                say(f"  -> {name}: {self.samples[name][-1]}")
                self.sql("TRUNCATE {outbox}")
        for name, samples in self.samples.items():
            self.results[name] = combine(samples)
        for name, step in once:
            if only and name not in only:
                continue
            self.results[name] = step()
            say(f"  -> {name}: {self.results[name]}")
            self.sql("TRUNCATE {outbox}")
        self.ratios()
        return self.results

    def ratios(self) -> None:
        """Ratios within each round, then their median, min and max."""
        s = self.samples

        def ratio(key: str, top: str, bottom: str, digits: int) -> None:
            pairs = zip(s.get(top, []), s.get(bottom, []), strict=False)
            values = [a["rate"] / b["rate"] for a, b in pairs if b["rate"]]
            if values:
                self.results[key] = {
                    "ratio": round(statistics.median(values), digits),
                    "min": round(min(values), digits),
                    "max": round(max(values), digits),
                }

        ratio("relay_vs_limit", "relay_backlog", "limit", 3)
        ratio("relay_vs_naive", "relay_backlog", "naive", 1)
        small, big = (f"scaling_{n}" for n in (self.opts.scale_rows + (0, 0))[:2])
        ratio("scaling_ratio", big, small, 2)
