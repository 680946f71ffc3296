"""``dsmeter simulate``: serve the bundled DeepSeek-compatible simulator in the foreground."""

from __future__ import annotations

import click

__all__ = ["simulate"]

# A long-running simulator keeps only the most recent calls in memory.
_LOG_LIMIT = 10_000


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind (loopback by default).")
@click.option("--port", default=8788, show_default=True, type=click.IntRange(0, 65535),
              help="Port to listen on; 0 picks a free one (the URL printed says which).")
@click.option("--seed", default=0, show_default=True, help="Seed: the same requests get the same answers.")
@click.option("--chunk-delay-ms", default=0.0, show_default=True, type=click.FloatRange(0, 600_000),
              help="Default delay between streamed chunks (a request's X-Simulator-Chunk-Delay-Ms overrides it).")
@click.option("--fault-rate", default=0.0, show_default=True, type=click.FloatRange(0, 1),
              help="Share of requests that fail at random (429, 503 or a mid-stream disconnect), seeded.")
@click.option("--db", "db", metavar="URL", default=None,
              help="Accepted like on every subcommand; the simulator keeps no ledger, so it is not used.")
def simulate(host: str, port: int, seed: int, chunk_delay_ms: float, fault_rate: float, db: str | None) -> None:
    """Serve a DeepSeek-compatible API on HOST:PORT for tests, demos and benchmarks.

    POST /chat/completions (and /v1/chat/completions), POST /anthropic/v1/messages,
    GET /models. Any non-empty Bearer key is accepted. Streams like DeepSeek: usage on the
    last content chunk, reasoning_content in thinking mode, tool calls in fragments, prefix
    caching in 64-token units per key. Faults and pacing per request with X-Simulator-*
    headers: Fault (402|422|429|500|503|disconnect|stall|malformed|error-event),
    Fault-After, Output-Tokens, Reasoning-Tokens, Chunk-Delay-Ms, Queue-Ms, Framing (crlf),
    Style (openai), Chunk-Bytes.

    Prints its URL on the first line of stdout once it is listening; Ctrl-C or SIGTERM stops it.
    """
    from collector.simulator import Simulator

    def ready(url: str) -> None:
        click.echo(f"DeepSeek simulator listening on {url} (seed {seed}); Ctrl-C to stop")

    simulator = Simulator(
        seed=seed, host=host, port=port, chunk_delay_ms=chunk_delay_ms, fault_rate=fault_rate, log_limit=_LOG_LIMIT
    )
    simulator.run_forever(on_ready=ready)
    click.echo("simulator stopped", err=True)
