"""What the pricing commands (estimate, prices, reprice, replay) share: ``--prices``, times, numbers, money text."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from fractions import Fraction
from typing import Any, TypeVar

import click

from collector.errors import UsageError
from collector.pricebook import ENV_PRICES, PriceBook, load_book

__all__ = [
    "prices_option",
    "book_for",
    "parse_instant",
    "parse_count",
    "parse_share",
    "money_text",
    "percent_text",
    "instant_text",
]

F = TypeVar("F", bound=Callable[..., Any])

prices_option: Callable[[F], F] = click.option(
    "--prices",
    "prices",
    metavar="FILE",
    default=None,
    help=f"Price book (TOML) to use. Default: ${ENV_PRICES}, else the book shipped with dsmeter. "
    'A book with [book] extends = "dsmeter" is layered over the shipped one; otherwise it replaces it.',
)

_SYMBOLS = {"USD": "$", "CNY": "¥"}


def book_for(prices: str | None) -> PriceBook:
    """The book a command prices with (raises PriceBookError, a UsageError, naming what is wrong)."""
    return load_book(prices)


def parse_instant(text: str | None, *, option: str) -> datetime:
    """``YYYY-MM-DD`` (00:00 UTC that day), an ISO datetime (UTC unless it has an offset), or ``now``."""
    if text is None or text.strip().lower() == "now":
        return datetime.now(timezone.utc)
    from collector.commands.export import parse_time_bound

    return parse_time_bound(text, option=option, end=False)


def parse_count(text: str | None, *, option: str, default: int | None = None) -> Decimal:
    """A non-negative number of calls or tokens (``1000000``, ``1_000_000``, ``1,000,000``, ``2.5``)."""
    if text is None:
        if default is None:
            raise UsageError(f"{option} is required")
        return Decimal(default)
    cleaned = text.strip().replace("_", "").replace(",", "")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        raise UsageError(f"{option} {text!r} is not a number") from None
    if not value.is_finite():
        raise UsageError(f"{option} {text!r} is not a number")
    if value < 0:
        raise UsageError(f"{option} must not be negative, got {text}")
    return value


def parse_share(text: str | None, *, option: str) -> Decimal | None:
    """A share from 0 to 1 (``0.3``), or a percentage (``30%``)."""
    if text is None:
        return None
    cleaned = text.strip()
    scale = Decimal(1)
    if cleaned.endswith("%"):
        cleaned, scale = cleaned[:-1], Decimal(100)
    try:
        value = Decimal(cleaned) / scale
    except InvalidOperation:
        raise UsageError(f"{option} {text!r} is not a number from 0 to 1") from None
    if not value.is_finite() or not 0 <= value <= 1:
        raise UsageError(f"{option} must be from 0 to 1 (or 0% to 100%), got {text}")
    return value


def money_text(value: Decimal | None, currency: str, *, places: int = 2) -> str:
    """``$1,682.00``: rounded half-up to ``places`` for reading (exact values go to json/csv)."""
    if value is None:
        return "unpriced"
    rounded = value.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP)
    sign = "-" if rounded < 0 else ""
    symbol = _SYMBOLS.get(currency)
    body = f"{abs(rounded):,.{places}f}"
    return f"{sign}{symbol}{body}" if symbol else f"{sign}{body} {currency}"


def percent_text(share: Fraction | Decimal) -> str:
    value = (Decimal(share.numerator) / Decimal(share.denominator)) if isinstance(share, Fraction) else share
    return f"{(value * 100).quantize(Decimal('0.01'), rounding=ROUND_HALF_UP)}%"


def instant_text(value: datetime | None) -> str:
    if value is None:
        return "open end"
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC").replace(":00 UTC", " UTC")
