"""DeepSeek Meter: meter every DeepSeek API call, price it exactly, show where the money goes.

    from openai import OpenAI
    import collector

    client = OpenAI(base_url="https://api.deepseek.com",
                    http_client=collector.metered_client(tags={"team": "search"}))

Everything else (the ledger, the price book, reports) lives in submodules; this package
exposes only what an application needs to start metering.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["metered_client", "async_metered_client", "UsageRecord", "Status"]

if TYPE_CHECKING:
    from collector.record import Status, UsageRecord
    from collector.transport import async_metered_client, metered_client


def __getattr__(name: str) -> Any:
    # Lazy, so `import collector` (and the CLI) does not pay for httpx or SQLAlchemy up front.
    if name in ("metered_client", "async_metered_client"):
        from collector import transport

        return getattr(transport, name)
    if name in ("UsageRecord", "Status"):
        from collector import record

        return getattr(record, name)
    raise AttributeError(f"module 'collector' has no attribute {name!r}")
