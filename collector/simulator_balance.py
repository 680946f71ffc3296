"""The simulator's account balance: what ``GET /user/balance`` reports, billed as DeepSeek bills.

Each call whose usage went out costs its tokens at the price book's prices (the book in
effect: ``$DSMETER_PRICES`` or the shipped one), at the instant the simulator's clock says.
Granted credit is spent before topped-up credit (DeepSeek's pricing page), neither goes
below zero (the account goes into debt on the topped-up side instead, as a postpaid
account would, so a test never loses a cost). Amounts are exact inside and shown to the
cent, as the API shows them. Pure apart from the lock: the server calls ``bill`` and
``payload``; tests call ``top_up``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from datetime import datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

__all__ = ["Account", "usage_tokens", "DEFAULT_GRANTED", "DEFAULT_TOPPED_UP"]

DEFAULT_GRANTED = Decimal("10.00")
DEFAULT_TOPPED_UP = Decimal("100.00")
_CENT = Decimal("0.01")
log = logging.getLogger("dsmeter.simulator")


def usage_tokens(usage: Mapping[str, Any]) -> tuple[int, int, int] | None:
    """(cache hit, cache miss, output) tokens of a DeepSeek or Anthropic-format usage object."""
    if "prompt_cache_hit_tokens" in usage:
        return (int(usage["prompt_cache_hit_tokens"]), int(usage.get("prompt_cache_miss_tokens") or 0),
                int(usage.get("completion_tokens") or 0))
    if "input_tokens" in usage:
        return (int(usage.get("cache_read_input_tokens") or 0), int(usage["input_tokens"]),
                int(usage.get("output_tokens") or 0))
    return None


class Account:
    """One account in one currency; ``bill`` charges a served call, ``top_up`` adds credit."""

    def __init__(self, granted: Decimal | str = DEFAULT_GRANTED, topped_up: Decimal | str = DEFAULT_TOPPED_UP,
                 currency: str = "USD") -> None:
        self.currency = currency
        self.granted = Decimal(str(granted))
        self.topped_up = Decimal(str(topped_up))
        self.billed = Decimal(0)  # everything charged so far, exact
        self._lock = threading.Lock()
        self._book: Any = None

    def _price_book(self) -> Any:
        if self._book is None:
            from collector.pricebook import load_book

            self._book = load_book()
        return self._book

    def cost(self, model: str, usage: Mapping[str, Any], at: datetime) -> Decimal | None:
        """What the call costs at the book's price in force at ``at``; None when the book has no price."""
        from collector.pricing import Quote, quote

        tokens = usage_tokens(usage)
        if tokens is None:
            return None
        hit, miss, output = tokens
        result = quote(self._price_book(), model, at, cache_hit_tokens=hit, cache_miss_tokens=miss,
                       output_tokens=output, currency=self.currency)
        return result.total if isinstance(result, Quote) else None

    def bill(self, model: str | None, usage: Mapping[str, Any] | None, at: datetime) -> Decimal:
        """Charge one served call (granted credit first); returns what it cost (0 if unpriced).

        Never raises: a broken price book ($DSMETER_PRICES) is logged and the call goes unbilled.
        """
        if not model or not usage:
            return Decimal(0)
        try:
            amount = self.cost(model, usage, at)
        except Exception as error:  # noqa: BLE001 - the simulator must keep serving
            log.error("simulator: cannot bill a call: %s", error)
            return Decimal(0)
        if amount is None or amount <= 0:
            return Decimal(0)
        with self._lock:
            from_granted = min(amount, max(self.granted, Decimal(0)))
            self.granted -= from_granted
            self.topped_up -= amount - from_granted
            self.billed += amount
        return amount

    def top_up(self, amount: Decimal | str) -> None:
        value = Decimal(str(amount))
        if value <= 0:
            raise ValueError("a top-up must be positive")
        with self._lock:
            self.topped_up += value

    def payload(self) -> dict[str, Any]:
        """The body of ``GET /user/balance``, amounts as strings to the cent."""
        with self._lock:
            granted, topped = self.granted, self.topped_up
        total = (granted + topped).quantize(_CENT, ROUND_HALF_EVEN)
        return {
            "is_available": total > 0,
            "balance_infos": [{
                "currency": self.currency,
                "total_balance": f"{total:.2f}",
                "granted_balance": f"{granted.quantize(_CENT, ROUND_HALF_EVEN):.2f}",
                "topped_up_balance": f"{topped.quantize(_CENT, ROUND_HALF_EVEN):.2f}",
            }],
        }
