"""How the dashboard writes numbers for people: money with its currency, tokens with units.

Pure functions, no Streamlit, so the tests can pin them and the pages stay thin. Money stays
``Decimal`` here: it is rounded for display with ROUND_HALF_UP (what an invoice does), never
passed through float. Only chart code turns money into floats, and only to draw it.
"""

from __future__ import annotations

import re
from decimal import ROUND_HALF_UP, Decimal

__all__ = [
    "CURRENCY_SYMBOLS",
    "money",
    "money_or_unpriced",
    "rate",
    "tokens",
    "count",
    "percent",
    "milliseconds",
    "signed_percent",
    "markdown_text",
]

# Currencies the price book can bill in get their symbol in front; anything else gets its
# ISO code after the number, so no figure is ever shown without saying what money it is.
CURRENCY_SYMBOLS: dict[str, str] = {"USD": "$", "CNY": "¥"}

_NONE = "—"


def money(amount: Decimal | int | None, currency: str | None, places: int = 2) -> str:
    """``$1,682.00``, ``¥12.50``, ``-$0.25``, ``3.10 EUR``; an unknown amount is an em dash."""
    if amount is None:
        return _NONE
    if isinstance(amount, float):
        raise TypeError("money must be a Decimal, not a float")
    value = Decimal(amount).quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP)
    if value == 0:
        value = abs(value)  # no "-$0.00" for a tiny negative that rounds away
    digits = f"{abs(value):,.{places}f}"
    sign = "-" if value < 0 else ""
    code = (currency or "").upper()
    symbol = CURRENCY_SYMBOLS.get(code)
    if symbol is not None:
        return f"{sign}{symbol}{digits}"
    return f"{sign}{digits} {code}".rstrip() if code else f"{sign}{digits}"


def money_or_unpriced(amount: Decimal | None, currency: str | None, places: int = 2) -> str:
    """Like ``money`` but says ``unpriced`` for a call the price book could not price (never $0)."""
    return "unpriced" if amount is None else money(amount, currency, places)


def rate(amount: Decimal | None, currency: str | None) -> str:
    """A price per million tokens as published: at least two decimals, every significant one kept.

    ``$0.028``, ``$1.74``, ``$0.003625``: a tariff is never rounded for display.
    """
    if amount is None:
        return _NONE
    places = max(2, -Decimal(amount).normalize().as_tuple().exponent)  # type: ignore[operator]
    return money(amount, currency, places=places)


_UNITS = ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "K"))


def tokens(value: int | None) -> str:
    """``950``, ``1.5K``, ``12.3K``, ``123K``, ``2B``: three significant digits with a unit."""
    if value is None:
        return _NONE
    n = int(value)
    sign = "-" if n < 0 else ""
    n = abs(n)
    if n < 1000:
        return f"{sign}{n}"
    for index, (size, unit) in enumerate(_UNITS):
        if n >= size:
            scaled = Decimal(n) / size
            text = _three_significant(scaled)
            # 999,999 rounds to "1000K": show it as "1M", one unit up.
            if Decimal(text) >= 1000 and index > 0:
                bigger, bigger_unit = _UNITS[index - 1]
                return f"{sign}{_three_significant(Decimal(n) / bigger)}{bigger_unit}"
            return f"{sign}{text}{unit}"
    return f"{sign}{n}"  # pragma: no cover - n >= 1000 always matches "K"


def _three_significant(value: Decimal) -> str:
    if value >= 100:
        text = str(value.quantize(Decimal(1), rounding=ROUND_HALF_UP))
    elif value >= 10:
        text = str(value.quantize(Decimal("0.1"), rounding=ROUND_HALF_UP))
    else:
        text = str(value.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


def count(value: int | None) -> str:
    """A whole number with thousands separators: ``1,000,000``."""
    return _NONE if value is None else f"{int(value):,}"


def percent(ratio: float | Decimal | None, places: int = 1) -> str:
    """A ratio (0..1) as ``42.5%``."""
    if ratio is None:
        return _NONE
    return f"{float(ratio) * 100:.{places}f}%"


def signed_percent(ratio: float | Decimal | None, places: int = 1) -> str:
    """A change as ``+12.0%`` / ``-3.5%``; unknown (e.g. nothing the day before) is an em dash."""
    if ratio is None:
        return _NONE
    return f"{float(ratio) * 100:+.{places}f}%"


def milliseconds(value: float | None) -> str:
    """A duration in ms, switching to seconds past ten seconds: ``850 ms``, ``12.4 s``."""
    if value is None:
        return _NONE
    if value >= 10_000:
        return f"{value / 1000:,.1f} s"
    return f"{value:,.0f} ms"


# What Streamlit's Markdown would read as markup in a figure or a label: emphasis, links, code,
# HTML, headings, tables, "$...$" (LaTeX) and ":name[...]" / ":emoji:" (its directives).
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]{}<>#|$~:])")


def markdown_text(text: str) -> str:
    """``text`` escaped for Streamlit's Markdown, so ``$908.84`` shows as money, not as the start of LaTeX."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text)
