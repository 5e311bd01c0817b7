"""`hvd-abs env`."""
from __future__ import annotations

import json

import click


@click.command("env")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def command(as_json: bool) -> None:
    """Report Python, torch (and CUDA), torchvision, Horovod's build, Ray and the extension backend."""
    from hvd_abs.env_report import collect, format_text

    report = collect()
    click.echo(json.dumps(report, indent=2) if as_json else format_text(report))
