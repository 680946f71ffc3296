"""Monthly budgets: a limit on the spend of a scope of calls, checked against month-to-date and forecast.

A budget is (scope, currency, monthly amount, soft fraction). The scope is a tag filter
(``{"team": "search"}``; ``{}`` = every call). Its state for a month, decided by ``judge``
(pure, exact Decimal arithmetic, boundaries spelled out because alerts depend on them):

* ``exceeded``: month-to-date spend is strictly more than the monthly amount;
* ``soft``: not exceeded, but spend has reached ``soft x monthly`` (>=), or the month-end
  forecast is strictly more than the monthly amount;
* ``ok``: otherwise.

``dsmeter budget check`` and ``dsmeter report`` exit with ``exit_code_for``: 0 when every
budget is ok, ``EXIT_BUDGET_SOFT`` (4) when the worst is soft, ``EXIT_BUDGET_EXCEEDED`` (5)
when any is exceeded.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone, tzinfo
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from collector.errors import UsageError
from collector.queries import Filters, MonthForecast, month_forecast, require_tag_key
from collector.record import utcnow
from collector.reporting_schema import BUDGETS
from collector.store import LedgerStore

__all__ = [
    "EXIT_BUDGET_SOFT",
    "EXIT_BUDGET_EXCEEDED",
    "DEFAULT_SOFT",
    "OK",
    "SOFT",
    "EXCEEDED",
    "BudgetSpec",
    "BudgetStatus",
    "parse_amount",
    "parse_soft",
    "parse_currency",
    "parse_scope",
    "scope_label",
    "judge",
    "exit_code_for",
    "set_budget",
    "list_budgets",
    "remove_budget",
    "evaluate",
]

EXIT_BUDGET_SOFT = 4  # a soft threshold reached, or the forecast over the budget
EXIT_BUDGET_EXCEEDED = 5  # month-to-date spend over the budget
DEFAULT_SOFT = Decimal("0.8")
OK, SOFT, EXCEEDED = "ok", "soft", "exceeded"
_SEVERITY = {OK: 0, SOFT: 1, EXCEEDED: 2}
_MONEY_PLACES = 6  # a budget amount may have at most micro-units (the ledger keeps pico; people type cents)
_CURRENCY = re.compile(r"^[A-Z]{3}$")


@dataclass(frozen=True, slots=True)
class BudgetSpec:
    """A stored budget. ``scope`` maps tag keys to the value a call must carry ({} = all calls)."""

    id: int
    scope: dict[str, str]
    currency: str
    monthly: Decimal
    soft: Decimal


@dataclass(frozen=True, slots=True)
class BudgetStatus:
    """A budget judged at ``as_of``: spend, share of the budget, forecast and state."""

    budget: BudgetSpec
    as_of: datetime
    month_to_date: Decimal
    forecast: Decimal
    share: Decimal  # month_to_date / monthly, quantised to 1e-4
    forecast_share: Decimal
    state: str  # OK | SOFT | EXCEEDED
    reason: str  # one line saying why, for people


# -- parsing user input (every error is one line, exit 2) --------------------------------------


def parse_amount(text: str | Decimal | int) -> Decimal:
    """A positive budget amount with at most 6 decimal places."""
    try:
        value = Decimal(str(text).strip())
    except InvalidOperation:
        raise UsageError(f"not an amount: {text!r} (write e.g. 500 or 499.99)") from None
    if not value.is_finite():
        raise UsageError(f"not an amount: {text!r}")
    if value <= 0:
        raise UsageError(f"a budget must be a positive amount, got {value}")
    exponent = value.as_tuple().exponent
    if isinstance(exponent, int) and exponent < -_MONEY_PLACES:
        raise UsageError(f"a budget amount has at most {_MONEY_PLACES} decimal places, got {value}")
    if value >= Decimal(10) ** 12:
        raise UsageError(f"a budget amount must be below 10^12, got {value}")
    return value


def parse_soft(text: str | Decimal | float) -> Decimal:
    """The soft threshold as a fraction in (0, 1] (``0.8``), or a percentage (``80%``)."""
    raw = str(text).strip()
    try:
        value = Decimal(raw[:-1]) / 100 if raw.endswith("%") else Decimal(raw)
    except InvalidOperation:
        raise UsageError(f"not a soft threshold: {text!r} (write e.g. 0.8 or 80%)") from None
    if not value.is_finite() or not Decimal(0) < value <= 1:
        raise UsageError(f"the soft threshold must be above 0 and at most 1 (or 100%), got {raw}")
    exponent = value.normalize().as_tuple().exponent
    if isinstance(exponent, int) and exponent < -6:
        raise UsageError(f"the soft threshold has at most 6 decimal places, got {raw}")
    return value.normalize()


def parse_currency(text: str) -> str:
    code = text.strip().upper()
    if not _CURRENCY.match(code):
        raise UsageError(f"not a currency code: {text!r} (three letters, e.g. USD or CNY)")
    return code


def parse_scope(tags: Iterable[str]) -> dict[str, str]:
    """``["team=search", ...]`` as a scope; a key given twice, or without ``=value``, is an error."""
    scope: dict[str, str] = {}
    for item in tags:
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise UsageError(f"a tag must be key=value, got {item!r}")
        if key in scope:
            raise UsageError(f"tag key {key!r} given twice")
        scope[key] = value
    return dict(sorted(scope.items()))


def scope_label(scope: Mapping[str, str]) -> str:
    """``team=search,env=prod`` (sorted), or ``all calls``."""
    return ",".join(f"{k}={v}" for k, v in sorted(scope.items())) or "all calls"


def _scope_text(scope: Mapping[str, str]) -> str:
    return json.dumps(dict(sorted(scope.items())), ensure_ascii=False, separators=(",", ":"), sort_keys=True)


# -- judging (pure) --------------------------------------------------------------------------------


def _share(amount: Decimal, of: Decimal) -> Decimal:
    return (amount / of).quantize(Decimal("0.0001"), ROUND_HALF_EVEN)


def judge(budget: BudgetSpec, month_to_date: Decimal, forecast: Decimal, as_of: datetime) -> BudgetStatus:
    """The budget's state for this spend and forecast (see the module docstring for the rules)."""
    limit = budget.monthly
    threshold = budget.soft * limit
    if month_to_date > limit:
        state, reason = EXCEEDED, f"spent {month_to_date} of {limit} {budget.currency}"
    elif month_to_date >= threshold:
        state, reason = SOFT, f"spent {month_to_date}, at or over the soft threshold {threshold} {budget.currency}"
    elif forecast > limit:
        state, reason = SOFT, f"forecast {forecast} is over the budget {limit} {budget.currency}"
    else:
        state, reason = OK, f"spent {month_to_date}, forecast {forecast} of {limit} {budget.currency}"
    return BudgetStatus(
        budget=budget,
        as_of=as_of,
        month_to_date=month_to_date,
        forecast=forecast,
        share=_share(month_to_date, limit),
        forecast_share=_share(forecast, limit),
        state=state,
        reason=reason,
    )


def exit_code_for(statuses: Sequence[BudgetStatus]) -> int:
    """0 when all are ok (or there are none), 4 when the worst is soft, 5 when any is exceeded."""
    worst = max((_SEVERITY[s.state] for s in statuses), default=0)
    return {0: 0, 1: EXIT_BUDGET_SOFT, 2: EXIT_BUDGET_EXCEEDED}[worst]


# -- storage ---------------------------------------------------------------------------------------


def _spec(row: Sequence[Any]) -> BudgetSpec:
    return BudgetSpec(id=int(row[0]), scope=json.loads(row[1]), currency=str(row[2]), monthly=row[3], soft=row[4])


_COLUMNS = (BUDGETS.c.id, BUDGETS.c.scope, BUDGETS.c.currency, BUDGETS.c.monthly, BUDGETS.c.soft)


def set_budget(
    store: LedgerStore,
    scope: Mapping[str, str],
    monthly: Decimal,
    *,
    currency: str = "USD",
    soft: Decimal = DEFAULT_SOFT,
    allow_new_tags: bool = False,
) -> tuple[BudgetSpec, bool]:
    """Create the budget for (scope, currency), or change its amounts. Returns (budget, created).

    A scope naming a tag key no call carries is refused (a typo would make a budget that never
    fires) unless ``allow_new_tags``.
    """
    monthly, soft, currency = parse_amount(monthly), parse_soft(soft), parse_currency(currency)
    store.ensure_schema()
    if not allow_new_tags:
        for key in scope:
            require_tag_key(store.engine, key)
    text = _scope_text(scope)
    with store.engine.connect() as connection:
        connection = connection.execution_options(dsmeter_sqlite_begin="BEGIN IMMEDIATE")
        with connection.begin():
            # The unique index on (scope, currency) settles a race between two `budget set`s.
            found = connection.execute(
                sa.select(BUDGETS.c.id).where(BUDGETS.c.scope == text, BUDGETS.c.currency == currency)
            ).first()
            if found is None:
                budget_id = connection.execute(
                    BUDGETS.insert().values(scope=text, currency=currency, monthly=monthly, soft=soft,
                                            created_at=utcnow()).returning(BUDGETS.c.id)
                ).scalar_one()
                created = True
            else:
                budget_id = found[0]
                connection.execute(BUDGETS.update().where(BUDGETS.c.id == budget_id).values(monthly=monthly, soft=soft))
                created = False
    return BudgetSpec(id=budget_id, scope=dict(sorted(scope.items())), currency=currency, monthly=monthly,
                      soft=soft), created


def list_budgets(engine: Engine) -> list[BudgetSpec]:
    """Every budget, ordered by scope then currency (a stable order for reports)."""
    with engine.connect() as connection:
        rows = connection.execute(sa.select(*_COLUMNS).order_by(BUDGETS.c.scope, BUDGETS.c.currency)).all()
    return [_spec(row) for row in rows]


def remove_budget(store: LedgerStore, scope: Mapping[str, str], currency: str = "USD") -> BudgetSpec:
    """Delete the budget for (scope, currency); a ``UsageError`` when there is none."""
    currency = parse_currency(currency)
    text = _scope_text(scope)
    store.ensure_schema()
    with store.engine.begin() as connection:
        row = connection.execute(
            sa.select(*_COLUMNS).where(BUDGETS.c.scope == text, BUDGETS.c.currency == currency)
        ).first()
        if row is None:
            raise UsageError(f"no {currency} budget for {scope_label(scope)} (see `dsmeter budget list`)")
        connection.execute(BUDGETS.delete().where(BUDGETS.c.id == row[0]))
    return _spec(row)


def evaluate(
    engine: Engine, as_of: datetime, budgets: Sequence[BudgetSpec] | None = None, *, tz: tzinfo = timezone.utc
) -> list[BudgetStatus]:
    """Judge every budget (or ``budgets``) at ``as_of``: month-to-date and forecast per its scope.

    The month is the calendar month in ``tz`` that contains the instant just before ``as_of``.
    """
    specs = list_budgets(engine) if budgets is None else list(budgets)
    statuses: list[BudgetStatus] = []
    cache: dict[str, dict[str, MonthForecast]] = {}
    for budget in specs:
        key = _scope_text(budget.scope)
        if key not in cache:
            scope = {tag: (value,) for tag, value in budget.scope.items()}
            cache[key] = month_forecast(engine, Filters(tags=scope), as_of, tz=tz)
        figures = cache[key].get(budget.currency)
        zero = Decimal(0)
        statuses.append(judge(
            budget,
            figures.month_to_date if figures else zero,
            figures.forecast if figures else zero,
            as_of,
        ))
    return statuses
