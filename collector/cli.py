"""``dsmeter``: the one command. A thin shell over library functions.

Subcommands live in ``collector/commands/`` and are imported only when invoked, so
``dsmeter --help`` and light commands do not pay for pandas or Streamlit.
Errors a user can act on print one line to stderr and exit non-zero; no tracebacks.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from collector.errors import DsmeterError

__all__ = ["main", "LazyGroup"]

# name -> "module:attribute". One line per subcommand; keep sorted.
SUBCOMMANDS: dict[str, str] = {
    "budget": "collector.commands.budget:budget",
    "dashboard": "collector.commands.dashboard:dashboard",
    "db": "collector.commands.db:db",
    "demo": "collector.commands.demo:demo",
    "estimate": "collector.commands.estimate:estimate",
    "export": "collector.commands.export:export",
    "prices": "collector.commands.prices:prices",
    "proxy": "collector.commands.proxy:proxy",
    "prune": "collector.commands.prune:prune",
    "reconcile": "collector.commands.reconcile:reconcile",
    "replay": "collector.commands.replay:replay",
    "report": "collector.commands.report:report",
    "reprice": "collector.commands.reprice:reprice",
    "rollup": "collector.commands.rollup:rollup",
    "simulate": "collector.commands.simulate:simulate",
    "spool": "collector.commands.spool:spool",
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use; also the one place errors become exit codes."""

    def __init__(self, *args: Any, lazy_subcommands: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_subcommands = lazy_subcommands or {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_subcommands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy_subcommands:
            module_name, attr = self.lazy_subcommands[cmd_name].split(":")
            command = getattr(importlib.import_module(module_name), attr)
            if not isinstance(command, click.Command):
                raise TypeError(f"{module_name}:{attr} is not a click command")
            return command
        return super().get_command(ctx, cmd_name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DsmeterError as error:
            click.echo(f"dsmeter: error: {error}", err=True)
            ctx.exit(error.exit_code)
        except KeyboardInterrupt:
            click.echo("dsmeter: interrupted", err=True)
            ctx.exit(130)


@click.group(
    cls=LazyGroup,
    lazy_subcommands=SUBCOMMANDS,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(package_name="dsmeter", prog_name="dsmeter")
def main() -> None:
    """DeepSeek Meter: meter every DeepSeek API call, price it exactly, see where the money goes.

    Every subcommand takes --db URL (a SQLAlchemy URL); DSMETER_DATABASE_URL sets the same;
    with neither, an embedded SQLite file in the user's data directory is used.
    """


if __name__ == "__main__":  # pragma: no cover - `python -m collector.cli`
    sys.exit(main())
