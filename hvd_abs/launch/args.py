"""The train options a launcher passes on (`hvd-abs launch horovod|ray`): checked before any
process starts, and rewritten where a launcher sets or completes them. A bad option is a
click.UsageError (one line, exit 2) or, from `hvd-abs train`'s own checks, a UserError."""
from __future__ import annotations

from pathlib import Path

import click


def check_hostfile(hostfile: str, min_np: int) -> list[tuple[str, int]]:
    """Parse the hostfile now: a bad line, or fewer slots than --min-np (a job that would wait
    for ever), is a one-line usage error, not a failure or a hang of a started job."""
    from pathlib import Path

    from hvd_abs.launch.discovery import HostfileError, parse_hostfile

    try:
        pool = parse_hostfile(Path(hostfile).read_text(), hostfile)
    except (OSError, UnicodeDecodeError, HostfileError) as exc:
        raise click.UsageError(f"--hostfile: {exc}") from None
    slots = sum(n for _, n in pool)
    if slots < min_np:
        raise click.UsageError(f"--hostfile {hostfile} offers {slots} slots but --min-np is {min_np}: add hosts "
                               f"or slots, or lower --min-np")
    return pool


def check_train(train_args: list[str], load_data: bool, script: str | None = None) -> None:
    """The training options as `hvd-abs train` checks them, before any process starts; with
    load_data (workers on this machine), the data set too. With a --script, its own arguments
    may be among them and the data set is its own (check_train_args). Its UserError (a bad
    option or data set) is for the command to say and exit 2 (user_errors_exit_2)."""
    from hvd_abs.training.options import check_train_args
    from hvd_abs.launch.horovod import option_value

    if not option_value(train_args, "--out"):
        raise click.UsageError("elastic training needs a run directory: pass --out DIR among the train options "
                               "(after --)")
    if script is not None and not script.endswith(".py"):
        raise click.UsageError(f"--script {script}: give a Python file (.py) that calls hvd_abs.fit")
    if script is not None and "--" in train_args:
        # The script's parse_train_args would stop at it: the options after it (--out among them)
        # would not be read as train options, though this launcher reads them.
        raise click.UsageError("a second `--` among the train options of a --script: drop it (the script's own "
                               "options go among the train options)")
    check_train_args(train_args, load_data=load_data, script=script is not None)


def config_inlined(train_args: tuple[str, ...] | list[str], script: bool = False) -> tuple[str, ...]:
    """The train options with a `--config FILE` replaced by the flags of its values (workers on
    other hosts need no copy of the file); as they are without one."""
    from hvd_abs.launch.horovod import option_value
    from hvd_abs.training.config_file import inline_config
    from hvd_abs.training.options import train_context

    args = list(train_args)
    if option_value(args, "--config") is None:
        return tuple(args)
    return tuple(inline_config(train_context(args, extras=script), args))


def out_of_resume(train_args: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The train options with `--out DIR` added when they give none, as `hvd-abs train` takes it
    (the launcher and every worker must name the same folder): `--resume DIR`'s own folder, or a
    new runs/<date>-<time> (said on stderr)."""
    from hvd_abs.launch.horovod import option_value
    from hvd_abs.training.run_dir import new_run_dir

    args = tuple(train_args)
    if option_value(list(args), "--out") is not None or "--" in args:
        return args
    resume = option_value(list(args), "--resume")
    if resume:
        return (*args, "--out", resume)
    out = new_run_dir(claim=False)  # (made by the job's lock when it starts)
    click.echo(f"run directory: {out}", err=True)
    return (*args, "--out", out)


def resume_of(train_args: list[str], run_dir: str | Path) -> tuple[str | None, bool]:
    """--resume of the train options as an absolute path (read by the launcher's job service,
    which serves it to the workers wherever they run), and whether it is the run directory
    itself (the run goes on in place)."""
    from hvd_abs.launch.horovod import option_value

    resume = option_value(train_args, "--resume")
    if not resume:
        return None, False
    resume = str(Path(resume).expanduser().resolve())
    return resume, resume == str(Path(run_dir).resolve())


# Options of `hvd-abs train` that a launcher sets on every worker's command line itself
# (build_command, `launch ray`): given among the train options too, the last one would win.
def refuse_launcher_options(train_args: list[str], command: str, max_np_option: str) -> None:
    """Raise click.UsageError (one line, exit 2) when the train options hold --max-np or --elastic,
    naming the launcher option to use instead. The options are read as `hvd-abs train` reads
    them (a value that looks like an option, or anything after `--`, is not one)."""
    from click.core import ParameterSource

    from hvd_abs.training.options import train_context

    try:
        ctx = train_context(list(train_args), extras=True, resilient=True)  # (a --script's own too)
    except click.ClickException:
        return  # unparseable: check_train says what is wrong
    if ctx.get_parameter_source("max_np") == ParameterSource.COMMANDLINE:
        raise click.UsageError(f"--max-np among the train options: `{command}` sets it for every worker from its "
                               f"own {max_np_option}; drop --max-np from the train options and pass "
                               f"{max_np_option} N before `--`")
    if ctx.get_parameter_source("elastic") == ParameterSource.COMMANDLINE:
        raise click.UsageError(f"--elastic among the train options: `{command}` starts every worker with --elastic "
                               f"itself; drop it from the train options")


def with_option(args: list[str], name: str, value: str) -> list[str]:
    """`args` with every `name VALUE` / `name=VALUE` set to `value`."""
    out, i = [], 0
    while i < len(args):
        if args[i] == name and i + 1 < len(args):
            out += [name, value]
            i += 2
            continue
        out.append(f"{name}={value}" if args[i].startswith(name + "=") else args[i])
        i += 1
    return out
