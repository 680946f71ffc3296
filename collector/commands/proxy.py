"""``dsmeter proxy``: the metering proxy in front of the DeepSeek API."""

from __future__ import annotations

import sys

import click

from collector.commands.options import db_option
from collector.config import database_url, redact_url
from collector.errors import UsageError
from collector.metering import InvalidTags, parse_tags

__all__ = ["proxy"]


def _tags(values: tuple[str, ...]) -> dict[str, str]:
    try:
        return parse_tags(",".join(values))
    except InvalidTags as error:
        raise UsageError(f"--tag: {error}") from None


@click.command()
@click.option(
    "--upstream",
    default="https://api.deepseek.com",
    show_default=True,
    metavar="URL",
    help="The API to forward to. Requests go there and nowhere else, whatever they ask.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0 for every interface).")
@click.option("--port", default=8787, show_default=True, type=click.IntRange(0, 65535), help="Port to listen on (0: any free port).")
@db_option
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(1, 256),
    help="Worker processes sharing the port (SO_REUSEPORT); each writes to the same ledger.",
)
@click.option(
    "--max-body-bytes",
    default=32 << 20,
    show_default=True,
    type=click.IntRange(1),
    help="Larger request bodies are refused with 413.",
)
@click.option("--connect-timeout", default=10.0, show_default=True, type=click.FloatRange(min=0, min_open=True), metavar="SECONDS", help="Time allowed to connect to the upstream.")
@click.option(
    "--read-timeout",
    default=60.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="Longest silence from the upstream (between two chunks, or before the response) before the call is a timeout.",
)
@click.option(
    "--thinking-read-timeout",
    default=300.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="The same, for calls that ask for thinking mode (long reasoning pauses).",
)
@click.option(
    "--drain-timeout",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    help="On SIGTERM/Ctrl-C, how long calls in flight may take to finish before they are cancelled.",
)
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE", help="Attribute every call through this proxy (repeatable); X-Dsmeter-Tags adds more per request.")
@click.option("-v", "--verbose", is_flag=True, help="Log more.")
def proxy(
    upstream: str,
    host: str,
    port: int,
    db: str | None,
    workers: int,
    max_body_bytes: int,
    connect_timeout: float,
    read_timeout: float,
    thinking_read_timeout: float,
    drain_timeout: float,
    tags: tuple[str, ...],
    verbose: bool,
) -> None:
    """Serve an OpenAI/DeepSeek-compatible API that meters every call into the ledger.

    Point any client at it: base_url="http://127.0.0.1:8787" for the openai SDK, or the same
    for curl, Node or Go. /chat/completions, /v1/chat/completions and /anthropic/v1/messages
    are metered (streamed through unbuffered); other paths are forwarded unmetered.
    GET /metrics serves Prometheus metrics, GET /healthz a health check.
    """
    from collector.proxy import ProxyConfig
    from collector.proxy_server import configure_logging, run_proxy

    config = ProxyConfig(
        upstream=upstream,
        host=host,
        port=port,
        db=db,
        workers=workers,
        max_body_bytes=max_body_bytes,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        thinking_read_timeout=thinking_read_timeout,
        drain_timeout=drain_timeout,
        tags=_tags(tags),
    )
    configure_logging(verbose)
    ledger = redact_url(database_url(db))
    plural = "s" if workers != 1 else ""

    def announce(url: str) -> None:
        click.echo(f"dsmeter proxy: listening on {url} -> {upstream} ({workers} worker{plural}, ledger {ledger})")
        sys.stdout.flush()

    run_proxy(config, on_ready=announce)
    click.echo("dsmeter proxy: stopped", err=True)
