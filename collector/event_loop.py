"""The event loop the proxy and the simulator run on: uvloop's where it is installed, else asyncio's.

uvloop (libuv, in C) makes each socket read and write cheaper, and those are most of what
the proxy and the simulator do per chunk. Nothing behaves differently on either loop: the
standard one is the fallback where uvloop is not built (Windows).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

__all__ = ["new_event_loop", "run"]


def _factory() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def new_event_loop() -> asyncio.AbstractEventLoop:
    return _factory()()


def run(main: Coroutine[Any, Any, None]) -> None:
    """``asyncio.run(main)`` on the loop above."""
    with asyncio.Runner(loop_factory=_factory()) as runner:
        runner.run(main)
