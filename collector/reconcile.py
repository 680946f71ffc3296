"""Reconciliation: does the provider's balance drop agree with the ledger's spend?

``dsmeter reconcile`` reads ``GET /user/balance`` with the configured key, stores a dated
snapshot per currency, and compares, per currency, each pair of consecutive snapshots in
the window: the balance drop against the ledger's spend on calls started between them.

A top-up (or a new grant) shows as a jump, never as negative spend:

* While granted credit remains after the window (DeepSeek spends granted credit first),
  usage is exactly the granted drop and a top-up exactly the rise of the topped-up balance.
* Otherwise a window whose balance rose holds a top-up whose size cannot be told apart from
  the usage inside it: it is reported (amount implied by the ledger: rise + ledger spend)
  and left out of the drift. Run reconcile often (hourly) so a top-up stays in a short window.
* A top-up smaller than the usage of its window, with no granted credit left, cannot be
  seen at all; it shows as negative drift.

Drift = ledger spend - provider usage over the measured windows; drift % is relative to the
provider's usage. Provider balances are given to the cent, so expect up to 0.01 per window.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Any
from urllib.parse import urlsplit

import httpx
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from collector.errors import UsageError
from collector.notify import RemoteError
from collector.queries import Filters, spend_totals
from collector.record import utcnow
from collector.reporting_schema import BALANCE_SNAPSHOTS
from collector.store import LedgerStore

__all__ = [
    "DEFAULT_UPSTREAM",
    "BALANCE_PATH",
    "CurrencyBalance",
    "BalanceReading",
    "Snapshot",
    "Window",
    "CurrencyReconciliation",
    "Reconciliation",
    "parse_balance",
    "fetch_balance",
    "store_reading",
    "snapshots",
    "reconcile_windows",
    "reconcile",
    "upstream_origin",
]

DEFAULT_UPSTREAM = "https://api.deepseek.com"
BALANCE_PATH = "/user/balance"
FETCH_TIMEOUT_S = 15.0
_CENT = Decimal("0.01")


@dataclass(frozen=True, slots=True)
class CurrencyBalance:
    currency: str
    total: Decimal
    granted: Decimal | None
    topped_up: Decimal | None


@dataclass(frozen=True, slots=True)
class BalanceReading:
    taken_at: datetime
    is_available: bool
    balances: tuple[CurrencyBalance, ...]


@dataclass(frozen=True, slots=True)
class Snapshot:
    taken_at: datetime
    total: Decimal
    granted: Decimal | None
    topped_up: Decimal | None


@dataclass(frozen=True, slots=True)
class Window:
    """Two consecutive snapshots and what happened between them."""

    start: datetime
    end: datetime
    balance_before: Decimal
    balance_after: Decimal
    ledger_spend: Decimal
    provider_usage: Decimal | None  # None: a top-up hid the usage (not measured)
    top_up: Decimal  # 0 when none; implied from the ledger when ``exact_top_up`` is False
    exact_top_up: bool

    @property
    def measured(self) -> bool:
        return self.provider_usage is not None


@dataclass(frozen=True, slots=True)
class CurrencyReconciliation:
    currency: str
    windows: tuple[Window, ...]
    provider_usage: Decimal  # over measured windows
    ledger_spend: Decimal  # over measured windows
    drift: Decimal  # ledger - provider
    drift_percent: Decimal | None  # of the provider's usage, 2 places; None when it used nothing
    top_ups: Decimal
    unmeasured_windows: int


@dataclass(frozen=True, slots=True)
class Reconciliation:
    upstream: str
    reading: BalanceReading
    currencies: tuple[CurrencyReconciliation, ...] = field(default=())


def upstream_origin(url: str) -> str:
    """``scheme://host[:port][/path]`` of an upstream URL, with any credentials and query cut out."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--upstream needs an http:// or https:// URL with a host, got {url!r}")
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path.rstrip('/')}"


def _money(value: Any, what: str) -> Decimal:
    try:
        amount = Decimal(str(value))
    except (InvalidOperation, ValueError):
        raise RemoteError(f"/user/balance sent a {what} that is not a number") from None
    if not amount.is_finite():
        raise RemoteError(f"/user/balance sent a {what} that is not a number")
    return amount


def parse_balance(body: Any, taken_at: datetime) -> BalanceReading:
    """DeepSeek's ``{"is_available": ..., "balance_infos": [{currency, total_balance, ...}]}``."""
    if not isinstance(body, dict) or not isinstance(body.get("balance_infos"), list):
        raise RemoteError("/user/balance answered without balance_infos; is --upstream a DeepSeek API?")
    balances: dict[str, CurrencyBalance] = {}
    for info in body["balance_infos"]:
        if not isinstance(info, dict) or not isinstance(info.get("currency"), str) or "total_balance" not in info:
            raise RemoteError("/user/balance sent a balance without currency or total_balance")
        currency = info["currency"].strip().upper()
        balances[currency] = CurrencyBalance(
            currency=currency,
            total=_money(info["total_balance"], "total_balance"),
            granted=None if info.get("granted_balance") is None else _money(info["granted_balance"], "granted_balance"),
            topped_up=None if info.get("topped_up_balance") is None
            else _money(info["topped_up_balance"], "topped_up_balance"),
        )
    return BalanceReading(
        taken_at=taken_at,
        is_available=bool(body.get("is_available", True)),
        balances=tuple(balances[c] for c in sorted(balances)),
    )


def fetch_balance(upstream: str, api_key: str, *, client: httpx.Client | None = None,
                  timeout: float = FETCH_TIMEOUT_S) -> BalanceReading:
    """``GET {upstream}/user/balance`` with ``api_key``; errors never contain the key."""
    origin = upstream_origin(upstream)
    own = client is None
    http = client if client is not None else httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False)
    try:
        response = http.get(origin + BALANCE_PATH, headers={"Authorization": f"Bearer {api_key}",
                                                            "Accept": "application/json"})
    except httpx.TimeoutException:
        raise RemoteError(f"{origin} did not answer {BALANCE_PATH} within {timeout:g}s") from None
    except httpx.HTTPError as error:
        raise RemoteError(f"{origin} is unreachable ({type(error).__name__})") from None
    finally:
        if own:
            http.close()
    taken_at = utcnow()
    if response.status_code == 401:
        raise RemoteError(f"{origin} refused the API key (HTTP 401); check the key's environment variable")
    if response.status_code != 200:
        raise RemoteError(f"{origin}{BALANCE_PATH} answered HTTP {response.status_code}")
    try:
        body = response.json()
    except ValueError:
        raise RemoteError(f"{origin}{BALANCE_PATH} did not answer JSON") from None
    return parse_balance(body, taken_at)


def store_reading(store: LedgerStore, upstream: str, reading: BalanceReading) -> None:
    """One ``balance_snapshots`` row per currency of ``reading``."""
    if not reading.balances:
        return
    store.ensure_schema()
    with store.engine.begin() as connection:
        connection.execute(BALANCE_SNAPSHOTS.insert(), [
            {"taken_at": reading.taken_at, "upstream": upstream, "currency": b.currency, "total_balance": b.total,
             "granted_balance": b.granted, "topped_up_balance": b.topped_up, "is_available": reading.is_available}
            for b in reading.balances
        ])


def snapshots(engine: Engine, upstream: str, currency: str, since: datetime | None = None,
              until: datetime | None = None) -> list[Snapshot]:
    """Stored snapshots of (upstream, currency) with ``since <= taken_at <= until``, oldest first."""
    table = BALANCE_SNAPSHOTS
    statement = sa.select(table.c.taken_at, table.c.total_balance, table.c.granted_balance,
                          table.c.topped_up_balance).where(table.c.upstream == upstream, table.c.currency == currency)
    if since is not None:
        statement = statement.where(table.c.taken_at >= since)
    if until is not None:
        statement = statement.where(table.c.taken_at <= until)
    with engine.connect() as connection:
        rows = connection.execute(statement.order_by(table.c.taken_at, table.c.id)).all()
    return [Snapshot(*row) for row in rows]


def _window(before: Snapshot, after: Snapshot, ledger: Decimal) -> Window:
    drop = before.total - after.total

    def window(usage: Decimal | None, top_up: Decimal, exact: bool) -> Window:
        return Window(start=before.taken_at, end=after.taken_at, balance_before=before.total,
                      balance_after=after.total, ledger_spend=ledger, provider_usage=usage, top_up=top_up,
                      exact_top_up=exact)

    split = None not in (before.granted, before.topped_up, after.granted, after.topped_up)
    if split:
        assert before.granted is not None and after.granted is not None
        assert before.topped_up is not None and after.topped_up is not None
        granted_drop = before.granted - after.granted
        topped_rise = after.topped_up - before.topped_up
        if after.granted > 0 and granted_drop >= 0 and topped_rise >= 0:
            # Granted credit is spent first and some is left: no usage touched the topped-up part.
            return window(granted_drop, topped_rise, True)
        if granted_drop < 0:
            return window(None, ledger - drop, False)
    if drop < 0:
        return window(None, ledger - drop, False)
    return window(drop, Decimal(0), True)


def reconcile_windows(
    currency: str, points: Sequence[Snapshot], ledger_spend: Callable[[datetime, datetime], Decimal]
) -> CurrencyReconciliation:
    """Compare each consecutive pair of ``points`` with ``ledger_spend(start, end)``. Pure given the callable."""
    windows = tuple(
        _window(before, after, ledger_spend(before.taken_at, after.taken_at))
        for before, after in zip(points, points[1:])
    )
    measured = [w for w in windows if w.provider_usage is not None]
    provider = sum((w.provider_usage for w in measured if w.provider_usage is not None), Decimal(0))
    ledger = sum((w.ledger_spend for w in measured), Decimal(0))
    drift = ledger - provider
    percent = (drift * 100 / provider).quantize(_CENT, ROUND_HALF_EVEN) if provider else None
    return CurrencyReconciliation(
        currency=currency,
        windows=windows,
        provider_usage=provider,
        ledger_spend=ledger,
        drift=drift,
        drift_percent=percent,
        top_ups=sum((w.top_up for w in windows), Decimal(0)),
        unmeasured_windows=len(windows) - len(measured),
    )


def reconcile(
    store: LedgerStore,
    upstream: str,
    api_key: str,
    *,
    since: datetime | None = None,
    key_fingerprints: Sequence[str] = (),
    client: httpx.Client | None = None,
) -> Reconciliation:
    """Take a snapshot now, store it, and reconcile each currency over ``[since, now]``.

    Without ``since`` the window is the previous snapshot to this one. ``key_fingerprints``
    limits the ledger side to calls made with those keys (default: every call, as the
    balance is the account's, shared by all its keys).
    """
    origin = upstream_origin(upstream)
    reading = fetch_balance(origin, api_key, client=client)
    store_reading(store, origin, reading)
    engine = store.engine
    cache: dict[tuple[datetime, datetime], Mapping[str, Decimal]] = {}

    def spend_of(currency: str) -> Callable[[datetime, datetime], Decimal]:
        def spend(start: datetime, end: datetime) -> Decimal:
            if (start, end) not in cache:
                cache[(start, end)] = spend_totals(
                    engine, Filters(since=start, until=end, key_fingerprints=tuple(key_fingerprints))
                )
            return cache[(start, end)].get(currency, Decimal(0))
        return spend

    results = []
    for balance in reading.balances:
        points = snapshots(engine, origin, balance.currency, since=since, until=reading.taken_at)
        if since is None:
            points = points[-2:]
        results.append(reconcile_windows(balance.currency, points, spend_of(balance.currency)))
    return Reconciliation(upstream=origin, reading=reading, currencies=tuple(results))
