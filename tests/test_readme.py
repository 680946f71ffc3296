"""README.md's two commands are the ones CI runs, so a missing install step cannot hide."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _bash_blocks(text: str) -> list[str]:
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_readme_has_a_demo_command_and_a_test_command_first() -> None:
    blocks = _bash_blocks((ROOT / "README.md").read_text())
    demo, test = blocks[0], blocks[1]
    assert "pip install -e ." in demo and demo.endswith("dsmeter demo")
    assert "pip install -e '.[test]'" in test and test.endswith("pytest")


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    test_command = _bash_blocks((ROOT / "README.md").read_text())[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command in ci.splitlines(), "the README's test command must appear as a line of .ci/run"
