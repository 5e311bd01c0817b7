"""The docs that are made from the code stay equal to it: the CLI reference is what `--help`
says, every option has a help text, and README stays a short entry point."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent


def test_the_cli_reference_is_what_the_cli_says() -> None:
    made = subprocess.run([sys.executable, str(ROOT / "scripts" / "cli_reference.py")], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert made.returncode == 0, made.stderr
    assert made.stdout == (ROOT / "docs" / "cli-reference.md").read_text(), (
        "docs/cli-reference.md is stale: python scripts/cli_reference.py > docs/cli-reference.md")


def test_every_option_of_every_command_has_a_help_text() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    from cli_reference import _commands

    from hvd_abs.cli import main

    missing = [f"{name} {p.opts[0]}" for name, cmd in _commands(main, "hvd-abs")
               for p in cmd.get_params(click.Context(cmd)) if isinstance(p, click.Option) and not p.hidden
               and not (p.help or "").strip()]
    assert not missing, missing


def test_the_readme_is_an_entry_point_of_at_most_200_lines() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    for link in ("docs/install.md", "docs/cli.md", "docs/cli-reference.md", "docs/results.md"):
        assert link in readme, link
