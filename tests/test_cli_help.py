"""Every command and subcommand has help text and exits 0 on --help; unknown input never tracebacks."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from collector.cli import SUBCOMMANDS, main


def _walk(command: click.Command, path: tuple[str, ...]) -> list[tuple[str, ...]]:
    found = [path]
    if isinstance(command, click.Group):
        ctx = click.Context(command)
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            assert sub is not None, f"{' '.join(path)} {name} does not load"
            found += _walk(sub, (*path, name))
    return found


ALL_COMMANDS = _walk(main, ())


def test_every_registered_subcommand_loads() -> None:
    ctx = click.Context(main)
    for name in SUBCOMMANDS:
        assert main.get_command(ctx, name) is not None


@pytest.mark.parametrize("path", ALL_COMMANDS, ids=lambda p: " ".join(p) or "dsmeter")
def test_every_command_has_help_text(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0, result.output
    command: click.Command = main
    ctx = click.Context(main)
    for name in path:
        assert isinstance(command, click.Group)
        sub = command.get_command(ctx, name)
        assert sub is not None
        command = sub
    assert (command.help or "").strip(), f"'dsmeter {' '.join(path)}' has no help text"


def test_unknown_subcommand_is_a_one_line_usage_error_with_exit_2() -> None:
    proc = subprocess.run([sys.executable, "-m", "collector.cli", "no-such-command"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "no-such-command" in proc.stderr
