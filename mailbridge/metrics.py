"""/metrics (SPEC section 7): the Prometheus text, right whichever process works.

Input: the store's counters and gauges (`StoreMetrics`: the worker's work is
counted in the same transactions that do it, so the figures survive restarts
and need no pipe between the processes) and the intake process's own counts
(refusals in the SMTP dialogue, which store nothing). Output: the exposition
text of prometheus_client, with the metric names of the contract.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from mailbridge.store import StoreMetrics

# Counters the store keeps: name -> (help, label names).
STORE_COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "mailbridge_emails_total": ("Emails taken into the store, by outcome", ("outcome",)),
    "mailbridge_sms_total": ("Recipients with their final code, by provider", ("provider", "code")),
    "mailbridge_delivery_reports_total": (
        "Delivery reports received, by provider and status", ("provider", "status")
    ),
    "mailbridge_replies_total": ("Reply SMS received, by provider", ("provider",)),
}  # fmt: skip
HISTOGRAM = "mailbridge_provider_call_seconds"
# Provider call durations, in seconds: the histogram's upper bounds.
CALL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _Snapshot(Collector):
    def __init__(self, store: StoreMetrics, refused: int, providers: Iterable[str]) -> None:
        self.store = store
        self.refused = refused
        self.providers = list(providers)

    def collect(self) -> Iterator[Metric]:
        families = {
            name: CounterMetricFamily(name.removesuffix("_total"), doc, labels=list(labels))
            for name, (doc, labels) in STORE_COUNTERS.items()
        }
        buckets: dict[str, dict[str, float]] = {}
        sums: dict[str, float] = {}
        for name, labels, value in self.store.counters:
            if name in families:
                families[name].add_metric(list(labels), value)
            elif name == HISTOGRAM + "_bucket":
                buckets.setdefault(labels[0], {})[labels[1]] = value
            elif name == HISTOGRAM + "_sum":
                sums[labels[0]] = sums.get(labels[0], 0.0) + value
        families["mailbridge_emails_total"].add_metric(["refused"], self.refused)
        yield from families.values()
        histogram = HistogramMetricFamily(
            HISTOGRAM, "Provider calls (one HTTP request or SMPP batch), in seconds",
            labels=["provider"],
        )  # fmt: skip
        for provider, by_bound in sorted(buckets.items()):
            pairs = [(b, by_bound.get(b, 0.0)) for b in [*map(str, CALL_BUCKETS), "+Inf"]]
            histogram.add_metric([provider], pairs, sums.get(provider, 0.0))
        yield histogram
        yield _gauge(
            "mailbridge_queue_recipients", "Recipients without a code yet, by state", "state",
            {"due": 0, "deferred": 0, "in_doubt": 0, **self.store.gauges.get("queue", {})},
        )  # fmt: skip
        yield _gauge(
            "mailbridge_reports", "Report mails by state", "state",
            {"pending": 0, "sent": 0, **self.store.gauges.get("reports", {})},
        )  # fmt: skip
        up = self.store.gauges.get("providers", {})
        yield _gauge(
            "mailbridge_provider_up",
            "1 while the provider takes calls; 0 while its circuit is open or it refuses our"
            " credentials",
            "provider",
            {p: int(up.get(p, True)) for p in self.providers},
        )
        waiting = GaugeMetricFamily(
            "mailbridge_events_waiting",
            "Delivery reports and replies whose message is not known yet",
            value=self.store.gauges.get("events_waiting", 0),
        )
        yield waiting


def _gauge(name: str, doc: str, label: str, values: Mapping[str, float]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family


def render_metrics(store: StoreMetrics, *, refused: int, providers: Iterable[str]) -> bytes:
    """The Prometheus exposition text of one snapshot."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(store, refused, providers))
    return generate_latest(registry)


def call_buckets(seconds: float) -> list[str]:
    """The histogram buckets one observation falls in (as label values)."""
    return [str(b) for b in CALL_BUCKETS if seconds <= b] + ["+Inf"]
