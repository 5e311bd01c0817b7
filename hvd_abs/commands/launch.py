"""`hvd-abs launch horovod|ray`: start elastic training and say exactly what was started."""
from __future__ import annotations

import click


@click.group("launch")
def command() -> None:
    """Launch elastic training through horovodrun or on a Ray cluster."""


@command.command("horovod", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--min-np", type=click.IntRange(min=1), default=1, show_default=True, help="Fewest workers to run with.")
@click.option("--max-np", type=click.IntRange(min=1), default=4, show_default=True,
              help="Most workers; the job asks for min(max-np, global batch / base batch).")
@click.option("--hostfile", type=click.Path(exists=True, dir_okay=False),
              help="Host pool, one 'HOST slots=N' line per host (default: localhost with max-np slots).")
@click.option("--network-interface", default="lo", show_default=True,
              help="NIC for Horovod's traffic; 'lo' for a single machine (without it the driver hangs).")
@click.option("--blacklist-cooldown", default="5,30", show_default=True,
              help="Seconds MIN,MAX before a host whose worker failed may be used again ('' = never).")
@click.option("--dry-run", is_flag=True, help="Print the horovodrun command without running it.")
@click.argument("train_args", nargs=-1, type=click.UNPROCESSED)
def horovod(min_np: int, max_np: int, hostfile: str | None, network_interface: str, blacklist_cooldown: str,
            dry_run: bool, train_args: tuple[str, ...]) -> None:
    """Build, print and run the elastic horovodrun command for `hvd-abs train TRAIN_ARGS`.

    Example: hvd-abs launch horovod --min-np 1 --max-np 2 -- --dataset digits --method absa --out runs/x
    """
    import shlex
    import subprocess
    import sys

    from hvd_abs.launch_horovod import build_command

    if max_np < min_np:
        raise click.BadParameter(f"--max-np ({max_np}) must be at least --min-np ({min_np})", param_hint="--max-np")
    try:
        cmd = build_command(list(train_args), min_np=min_np, max_np=max_np, hostfile=hostfile,
                            nic=network_interface, cooldown=blacklist_cooldown)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo("+ " + shlex.join(cmd), err=True)
    if not dry_run:
        sys.exit(subprocess.call(cmd))


@command.command("ray")
def ray() -> None:
    """Run elastic training with Ray actors as Horovod workers."""
    raise click.UsageError("`hvd-abs launch ray` is not implemented yet")
