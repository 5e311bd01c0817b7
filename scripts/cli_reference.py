"""Writes docs/cli-reference.md from the CLI itself: every command, and every option with its
default and help text, as `--help` gives them (tests/test_docs.py keeps the file equal to this).

    python scripts/cli_reference.py > docs/cli-reference.md
"""
from __future__ import annotations

import click

from hvd_abs.cli import main


def _commands(group: click.Group, prefix: str) -> list[tuple[str, click.Command]]:
    found = []
    ctx = click.Context(group)
    for name in sorted(group.list_commands(ctx)):
        cmd = group.get_command(ctx, name)
        if isinstance(cmd, click.Group):
            found += _commands(cmd, f"{prefix} {name}")
        else:
            found.append((f"{prefix} {name}", cmd))
    return found


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _default(ctx: click.Context, p: click.Option) -> str:
    value = p.get_default(ctx, call=True)
    if p.is_flag and not p.secondary_opts:
        return "on" if value else "off"
    if value is None or value == () or value == "":
        return ""
    if isinstance(value, (list, tuple)):
        value = ",".join(map(str, value))
    return f"`{value}`"


def reference() -> str:
    lines = ["# CLI reference (generated)", "",
             "Made from the commands themselves by `python scripts/cli_reference.py > docs/cli-reference.md`; "
             "a test keeps it equal to what `--help` says. The commands' narrative and examples: "
             "[cli.md](cli.md).", ""]
    for name, cmd in _commands(main, "hvd-abs"):
        ctx = click.Context(cmd, info_name=name)
        lines += [f"## `{name}`", "", _cell((cmd.help or "").split("\n\n")[0]), ""]
        options = [p for p in cmd.get_params(ctx) if isinstance(p, click.Option) and not p.hidden
                   and "--help" not in p.opts]
        arguments = [p for p in cmd.get_params(ctx) if isinstance(p, click.Argument)]
        if arguments:
            lines += ["Arguments: " + ", ".join(f"`{a.human_readable_name}`" for a in arguments), ""]
        if not options:
            continue
        grouped = any(getattr(p, "group", None) for p in options)
        lines += ["| option | group | default | what |" if grouped else "| option | default | what |",
                  "|---|---|---|---|" if grouped else "|---|---|---|"]
        for p in options:
            flags = " / ".join(p.opts + p.secondary_opts)
            if p.metavar or (not p.is_flag and p.type.name not in ("boolean",)):
                choices = getattr(p.type, "choices", None)
                flags += f" {'|'.join(choices)}" if choices else f" {p.metavar or p.type.name.upper()}"
            group = f" {p.group} |" if grouped else ""  # type: ignore[attr-defined]
            lines.append(f"| `{_cell(flags)}` |{group} {_default(ctx, p)} | {_cell(p.help or '')} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference(), end="")
