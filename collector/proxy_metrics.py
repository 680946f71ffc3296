"""The proxy's Prometheus metrics: counted from ledger records, rendered as text exposition format.

Requests, tokens, errors and timings are counted when a call ends; cost is counted when the
ledger writer has stored the call, because the writer is what prices it (on its own thread,
from the price book): ``written`` is its ``on_written`` hook. A call with no price (no
pricer configured, or a model the price book does not know) is counted as unpriced, never
as $0.

Labels are the model and the status only (plus a fixed token ``bucket`` and a ``currency``),
so cardinality is bounded: model names come from client request bodies, so after
``max_models`` distinct names every further one is counted as ``other``.

With several worker processes each worker counts what it served, publishes a snapshot to
a shared directory about once a second, and answers ``/metrics`` with the sum of its own
live counters and the other workers' latest snapshots (the idea of prometheus_client's
multiprocess mode, done with plain JSON files). So a scrape of any worker sees the whole
proxy, with the other workers' share up to one publish interval old; counters of a worker
that exited stay in the sum, so totals never go backwards.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from collector.record import Status, UsageRecord

__all__ = ["ProxyMetrics", "MetricsExchange", "Snapshot", "merge_snapshots", "render", "TTFT_BUCKETS"]

Snapshot = dict[str, Any]  # JSON-able: {"counters": {...}, "histograms": {...}, "gauges": {...}}

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
DURATION_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_ERROR_STATUSES = frozenset({Status.ERROR.value, Status.TIMEOUT.value, Status.DISCONNECTED.value})
_SEP = "\x1f"  # joins label values into one JSON object key


@dataclass(frozen=True, slots=True)
class _Spec:
    kind: str  # "counter" | "histogram" | "gauge"
    labels: tuple[str, ...]
    help: str
    buckets: tuple[float, ...] = ()


SPECS: dict[str, _Spec] = {
    "dsmeter_proxy_requests_total": _Spec(
        "counter", ("model", "status"), "Metered calls by the model that served them and how they ended."
    ),
    "dsmeter_proxy_errors_total": _Spec(
        "counter", ("model", "status"), "Metered calls that ended in error, timeout or disconnect."
    ),
    "dsmeter_proxy_tokens_total": _Spec(
        "counter",
        ("model", "bucket"),
        "Tokens the provider billed, by bucket (reasoning is part of completion).",
    ),
    "dsmeter_proxy_estimated_tokens_total": _Spec(
        "counter",
        ("model", "bucket"),
        "Tokens estimated for calls that ended without the provider's usage (flagged in the ledger).",
    ),
    "dsmeter_proxy_cost_total": _Spec(
        "counter",
        ("model", "currency"),
        "Cost of metered calls, counted when the ledger writer has stored them with a price.",
    ),
    "dsmeter_proxy_unpriced_requests_total": _Spec(
        "counter", ("model", "status"), "Metered calls the ledger writer stored without a price."
    ),
    "dsmeter_proxy_passthrough_requests_total": _Spec(
        "counter", ("status",), "Unmetered requests forwarded to the upstream, by HTTP status."
    ),
    "dsmeter_proxy_rejected_requests_total": _Spec(
        "counter", ("status",), "Requests the proxy refused itself (bad target, bad tags, body too large)."
    ),
    "dsmeter_proxy_ttft_seconds": _Spec(
        "histogram", ("model",), "Time from the request to the first streamed token.", TTFT_BUCKETS
    ),
    "dsmeter_proxy_duration_seconds": _Spec(
        "histogram", ("model", "status"), "Time from the request to the end of the call.", DURATION_BUCKETS
    ),
    "dsmeter_proxy_in_flight_requests": _Spec("gauge", (), "Requests being forwarded right now."),
    "dsmeter_proxy_workers": _Spec("gauge", (), "Worker processes whose counters are summed in this scrape."),
}

_TOKEN_BUCKETS = (
    ("prompt_cache_hit", "prompt_cache_hit_tokens"),
    ("prompt_cache_miss", "prompt_cache_miss_tokens"),
    ("completion", "completion_tokens"),
    ("reasoning", "reasoning_tokens"),
)


class ProxyMetrics:
    """One worker's counters. Not thread-safe: the worker's event loop is its only user."""

    def __init__(self, *, max_models: int = 64) -> None:
        self._max_models = max_models
        self._models: set[str] = set()
        self._counters: dict[str, dict[tuple[str, ...], Decimal]] = {}
        self._histograms: dict[str, dict[tuple[str, ...], list[Any]]] = {}
        self.in_flight = 0

    # -- counting ---------------------------------------------------------------------------

    def _model(self, record: UsageRecord) -> str:
        name = (record.model or record.requested_model or "unknown")[:64]
        if name in self._models:
            return name
        if len(self._models) >= self._max_models:
            return "other"
        self._models.add(name)
        return name

    def _inc(self, metric: str, labels: tuple[str, ...], value: Decimal | int = 1) -> None:
        series = self._counters.setdefault(metric, {})
        series[labels] = series.get(labels, Decimal(0)) + value

    def _observe(self, metric: str, labels: tuple[str, ...], value: float) -> None:
        buckets = SPECS[metric].buckets
        series = self._histograms.setdefault(metric, {})
        entry = series.get(labels)
        if entry is None:
            entry = series[labels] = [[0] * len(buckets), 0.0, 0]
        for i, bound in enumerate(buckets):
            if value <= bound:
                entry[0][i] += 1
                break
        entry[1] += value
        entry[2] += 1

    def observe(self, record: UsageRecord) -> None:
        """Count one finished metered call."""
        model = self._model(record)
        status = record.status
        self._inc("dsmeter_proxy_requests_total", (model, status))
        if status in _ERROR_STATUSES:
            self._inc("dsmeter_proxy_errors_total", (model, status))
        tokens_metric = (
            "dsmeter_proxy_estimated_tokens_total" if record.usage_estimated else "dsmeter_proxy_tokens_total"
        )
        for bucket, attr in _TOKEN_BUCKETS:
            value = getattr(record, attr)
            if value:
                self._inc(tokens_metric, (model, bucket), int(value))
        if record.ttft_ms is not None:
            self._observe("dsmeter_proxy_ttft_seconds", (model,), record.ttft_ms / 1000.0)
        if record.duration_ms is not None:
            self._observe("dsmeter_proxy_duration_seconds", (model, status), record.duration_ms / 1000.0)

    def written(self, records: Iterable[UsageRecord]) -> None:
        """Count the cost of calls the ledger writer has stored (it prices them on the way in)."""
        for record in records:
            model = self._model(record)
            if record.cost is not None and record.currency:
                self._inc("dsmeter_proxy_cost_total", (model, record.currency[:8]), record.cost)
            else:
                self._inc("dsmeter_proxy_unpriced_requests_total", (model, record.status))

    def passthrough(self, http_status: int) -> None:
        self._inc("dsmeter_proxy_passthrough_requests_total", (str(http_status),))

    def rejected(self, http_status: int) -> None:
        self._inc("dsmeter_proxy_rejected_requests_total", (str(http_status),))

    # -- exporting --------------------------------------------------------------------------

    def snapshot(self, *, exiting: bool = False) -> Snapshot:
        """Counters as JSON-able data. A worker's last snapshot (``exiting``) keeps its counters
        in the proxy's totals but no longer counts it as a live worker or its requests in flight."""
        gauges = {} if exiting else {"dsmeter_proxy_in_flight_requests": self.in_flight, "dsmeter_proxy_workers": 1}
        return {
            "counters": {
                metric: {_SEP.join(labels): str(value) for labels, value in series.items()}
                for metric, series in self._counters.items()
            },
            "histograms": {
                metric: {_SEP.join(labels): [list(e[0]), e[1], e[2]] for labels, e in series.items()}
                for metric, series in self._histograms.items()
            },
            "gauges": gauges,
        }


def merge_snapshots(snapshots: Iterable[Snapshot]) -> Snapshot:
    """Sum several workers' snapshots into one (counters, histogram buckets and gauges all add up)."""
    counters: dict[str, dict[str, Decimal]] = {}
    histograms: dict[str, dict[str, list[Any]]] = {}
    gauges: dict[str, int] = {}
    for snap in snapshots:
        for metric, series in snap.get("counters", {}).items():
            target = counters.setdefault(metric, {})
            for key, value in series.items():
                target[key] = target.get(key, Decimal(0)) + Decimal(value)
        for metric, hseries in snap.get("histograms", {}).items():
            htarget = histograms.setdefault(metric, {})
            for key, (counts, total, count) in hseries.items():
                entry = htarget.get(key)
                if entry is None:
                    htarget[key] = [list(counts), float(total), int(count)]
                else:
                    entry[0] = [a + b for a, b in zip(entry[0], counts, strict=True)]
                    entry[1] += float(total)
                    entry[2] += int(count)
        for name, value in snap.get("gauges", {}).items():
            gauges[name] = gauges.get(name, 0) + int(value)
    return {
        "counters": {m: {k: str(v) for k, v in s.items()} for m, s in counters.items()},
        "histograms": histograms,
        "gauges": gauges,
    }


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(names: tuple[str, ...], key: str, extra: tuple[tuple[str, str], ...] = ()) -> str:
    values = key.split(_SEP) if names else []
    pairs = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    pairs.extend(f'{n}="{v}"' for n, v in extra)
    return "{" + ",".join(pairs) + "}" if pairs else ""


def _number(value: Decimal | float | int) -> str:
    if isinstance(value, Decimal):
        text = format(value.normalize(), "f")
        return text
    if isinstance(value, float):
        return repr(value)
    return str(value)


def render(snapshot: Mapping[str, Any]) -> str:
    """Prometheus text exposition format (version 0.0.4)."""
    lines: list[str] = []
    counters = snapshot.get("counters", {})
    histograms = snapshot.get("histograms", {})
    gauges = snapshot.get("gauges", {})
    for metric, spec in SPECS.items():
        lines.append(f"# HELP {metric} {spec.help}")
        lines.append(f"# TYPE {metric} {spec.kind}")
        if spec.kind == "counter":
            for key, value in sorted(counters.get(metric, {}).items()):
                lines.append(f"{metric}{_labels(spec.labels, key)} {_number(Decimal(value))}")
        elif spec.kind == "gauge":
            lines.append(f"{metric} {int(gauges.get(metric, 0))}")
        else:
            for key, (counts, total, count) in sorted(histograms.get(metric, {}).items()):
                cumulative = 0
                for bound, n in zip(spec.buckets, counts, strict=True):
                    cumulative += n
                    le = (("le", repr(float(bound))),)
                    lines.append(f"{metric}_bucket{_labels(spec.labels, key, le)} {cumulative}")
                lines.append(f"{metric}_bucket{_labels(spec.labels, key, (('le', '+Inf'),))} {count}")
                lines.append(f"{metric}_sum{_labels(spec.labels, key)} {_number(float(total))}")
                lines.append(f"{metric}_count{_labels(spec.labels, key)} {count}")
    return "\n".join(lines) + "\n"


class MetricsExchange:
    """Workers' snapshots in a shared directory: each worker writes its own file, reads the others'."""

    def __init__(self, directory: Path, worker_id: str) -> None:
        self.directory = directory
        self._own = directory / f"worker-{worker_id}.json"

    def publish(self, snapshot: Snapshot) -> None:
        # Write then rename, so a reader never sees half a file.
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(snapshot, handle, separators=(",", ":"))
            os.replace(tmp, self._own)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def others(self) -> list[Snapshot]:
        found: list[Snapshot] = []
        for path in sorted(self.directory.glob("worker-*.json")):
            if path == self._own:
                continue
            try:
                snap = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # unreadable for a moment; its numbers arrive with the next scrape
            found.append(snap)
        return found
