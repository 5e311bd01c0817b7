"""`hvd-abs launch horovod|ray`: start elastic training and say exactly what was started."""
from __future__ import annotations

import contextlib
import functools
import re

import click

from hvd_abs.errors import user_errors_exit_2
from hvd_abs.launch.discovery import WARM_TIMEOUT_S as HOROVOD_WARM_TIMEOUT_S
from hvd_abs.launch.ray_executor import WARM_TIMEOUT_S as RAY_WARM_TIMEOUT_S


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
@click.option("--warm", type=click.IntRange(min=0), default=0, show_default=True,
              help="Keep this many pre-started, pre-imported standby workers ready on this host; "
                   "growth adds slots only as standbys are ready, so joins skip the cold start "
                   "(with --script, the imports: the script still loads its data at the join).")
@click.option("--warm-timeout", type=click.FloatRange(min=0), default=HOROVOD_WARM_TIMEOUT_S, show_default=True,
              help="With --warm: seconds growth waits for ready standbys before adding the slots cold.")
@click.option("--script", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Run this Python script as every worker instead of `hvd-abs train`: one that trains its own "
                   "model and data with hvd_abs.fit and reads its options with hvd_abs.parse_train_args.")
@click.option("--dry-run", is_flag=True, help="Print the horovodrun command without running it.")
@click.argument("train_args", nargs=-1, type=click.UNPROCESSED)
def horovod(min_np: int, max_np: int, hostfile: str | None, network_interface: str, blacklist_cooldown: str,
            warm: int, warm_timeout: float, script: str | None, dry_run: bool, train_args: tuple[str, ...]) -> None:
    """Build, print and run the elastic horovodrun command for `hvd-abs train TRAIN_ARGS`
    (or for `python SCRIPT TRAIN_ARGS` with --script).

    Example: hvd-abs launch horovod --min-np 1 --max-np 2 -- --dataset digits --method absa --out runs/x
    """
    import shlex
    import signal
    import sys
    import time

    from hvd_abs.launch.horovod import Refusals, build_command, run_with_standbys

    if max_np < min_np:
        raise click.BadParameter(f"--max-np ({max_np}) must be at least --min-np ({min_np})", param_hint="--max-np")
    train_args = out_of_resume(train_args)
    refuse_launcher_options(list(train_args), "hvd-abs launch horovod", max_np_option="--max-np")
    if hostfile:
        _check_hostfile(hostfile, min_np)
    _check_train(list(train_args), load_data=hostfile is None, script=script)  # (else the data lives on the hosts)
    try:
        cmd = build_command(list(train_args), min_np=min_np, max_np=max_np, hostfile=hostfile,
                            nic=network_interface, cooldown=blacklist_cooldown, warm=warm > 0,
                            warm_timeout=warm_timeout, script=script)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo("+ " + shlex.join(cmd), err=True)
    if dry_run:
        return
    from hvd_abs.elastic.world_signal import start_job
    from hvd_abs.launch.horovod import Terminated, run_dir_of, run_horovodrun, stop_on_termination

    started = time.time()
    lock = _locked(run_dir_of(list(train_args)))  # the job's, while it runs (its workers come and go)
    start_job(run_dir_of(list(train_args)), min_np)
    held: list[str] = []  # horovodrun's own traceback, kept out of the output until the outcome is known
    refusals = Refusals()  # workers' "Error: ..." lines (a refused input, exit 2) and exit codes
    try:
        with lock, stop_on_termination():
            if warm:
                code = run_with_standbys(cmd, list(train_args), max_np=max_np, keep=warm, held=held,
                                         refusals=refusals, script=script is not None)
            else:
                code = run_horovodrun(cmd, held, refusals)
    except Terminated as stop:
        name = signal.Signals(stop.signum).name
        click.echo(f"hvd-abs launch horovod: {name} received: the job was stopped (its workers and standbys "
                   f"too); continue it with -- --resume {run_dir_of(list(train_args))} (from its newest "
                   f"checkpoint, if it wrote one)", err=True)
        sys.exit(128 + stop.signum)
    refused = refusals.outcome() if code != 0 else None
    if refused is not None and finished_epochs(list(train_args), started) is None:
        _keep_report(list(train_args), "".join(held))
        _refused(refused)
    if code != 0:
        code = _report_failure(list(train_args), f"horovodrun exited {code}", started, "".join(held))
    elif held:  # (a traceback and exit 0: never seen; show it rather than drop it)
        sys.stderr.write("".join(held))
    sys.exit(code)


def _check_hostfile(hostfile: str, min_np: int) -> None:
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


@user_errors_exit_2
def _check_train(train_args: list[str], load_data: bool, script: str | None = None) -> None:
    """The training options as `hvd-abs train` checks them, before any process starts; with
    load_data (workers on this machine), the data set too. With a --script, its own arguments
    may be among them and the data set is its own (check_train_args)."""
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


def out_of_resume(train_args: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The train options with `--out DIR` added when only `--resume DIR` is given: `hvd-abs train`
    continues a run in its own folder then, and the launcher and every worker must name it."""
    from hvd_abs.launch.horovod import option_value

    args = tuple(train_args)
    resume = option_value(list(args), "--resume")
    if resume and not option_value(list(args), "--out") and "--" not in args:
        return (*args, "--out", resume)
    return args


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
        return  # unparseable: _check_train says what is wrong
    if ctx.get_parameter_source("max_np") == ParameterSource.COMMANDLINE:
        raise click.UsageError(f"--max-np among the train options: `{command}` sets it for every worker from its "
                               f"own {max_np_option}; drop --max-np from the train options and pass "
                               f"{max_np_option} N before `--`")
    if ctx.get_parameter_source("elastic") == ParameterSource.COMMANDLINE:
        raise click.UsageError(f"--elastic among the train options: `{command}` starts every worker with --elastic "
                               f"itself; drop it from the train options")


FAILURE_REPORT = "horovodrun-error.txt"  # in OUT/elastic/: horovodrun's traceback after a finished run


def finished_epochs(train_args: list[str], started: float) -> int | None:
    """The epoch count of the run in --out when this launch (begun at time `started`) finished
    it, else None. Finished: summary.json holds this run's final summary (the one
    hvd_abs.training.session.finish writes, with "metrics", after the final checkpoint), written since
    `started` (not a summary an earlier run left), for all the --epochs this launch planned."""
    import json
    import os
    from pathlib import Path

    from hvd_abs.training.options import config_from_options, train_context
    from hvd_abs.errors import UserError
    from hvd_abs.launch.horovod import option_value
    from hvd_abs.metrics import SUMMARY_FILE

    out = option_value(train_args, "--out")
    if not out:
        return None
    path = Path(out).expanduser() / SUMMARY_FILE
    try:
        ctx = train_context(list(train_args), extras=True, resilient=True)
        planned = config_from_options(dict(ctx.params), ctx).epochs  # (a resume's: the run's own unless given)
        if os.stat(path).st_mtime < started - 1.0:  # (1 s: coarse file-system clocks)
            return None
        summary = json.loads(path.read_text())
    except (OSError, ValueError, KeyError, TypeError, click.ClickException, UserError):
        return None
    epochs = summary.get("epochs") if isinstance(summary, dict) else None
    if not isinstance(planned, int) or not isinstance(epochs, int) or "metrics" not in summary or epochs < planned:
        return None
    return epochs


def job_outcome(train_args: list[str], why: str, started: float, report: str | None = None) -> tuple[int, str]:
    """After a launcher saw the job fail (`why`, e.g. "horovodrun exited 1"): (exit code, the line
    to print). A run that finished anyway (`finished_epochs`; e.g. a worker's wrapper process
    died while its Python process went on) is exit 0 and a warning naming its results: nothing
    was lost, and a rerun or --resume would have nothing to do (--resume refuses a finished run).
    `report`: where horovodrun's traceback was kept. Else exit 1 and how to go on: --resume
    from a checkpoint when there is one, else a rerun (with --overwrite when the failed run left
    files that would make a plain rerun be refused)."""
    from pathlib import Path

    from hvd_abs.training.checkpoint import list_checkpoints
    from hvd_abs.launch.horovod import option_value
    from hvd_abs.training.run_dir import CHECKPOINT_DIR, RUN_FILES

    out = option_value(train_args, "--out")
    epochs = finished_epochs(train_args, started)
    if epochs is not None:
        kept = f" (its traceback: {report})" if report else ""
        return 0, (f"Warning: the run finished all {epochs} epochs; its results are in {out} (summary.json, "
                   f"metrics.jsonl, {CHECKPOINT_DIR}/), but {why}: a worker process failed while or after the job "
                   f"ran{kept}; nothing needs rerunning")
    run_dir = Path(out).expanduser() if out else None
    if run_dir is not None and list_checkpoints(run_dir / CHECKPOINT_DIR):
        hint = f"continue from its newest good checkpoint: rerun with --resume {out} among the train options"
    elif run_dir is not None and "--overwrite" not in train_args and any((run_dir / f).exists() for f in RUN_FILES):
        hint = ("it left no checkpoint (pass --checkpoint-every N to keep some); rerun it with --overwrite among "
                "the train options")
    else:
        hint = "it left no checkpoint (pass --checkpoint-every N to keep some); rerun it"
    return 1, f"Error: the elastic job failed ({why}); {hint}"


def _refused(message: str) -> None:
    """A worker refused its input (bad options or data, said in one line, exit 2): that is the
    job's outcome too, not a failure a rerun or --resume would get past. Exits 2."""
    from hvd_abs.errors import exit_2

    exit_2(f"a worker refused its input: {message}")


def _keep_report(train_args: list[str], traceback: str) -> str | None:
    """Keep horovodrun's traceback in OUT/elastic/FAILURE_REPORT instead of printing it; returns
    the file's path, or None when it could not be written."""
    from pathlib import Path

    from hvd_abs.launch.horovod import option_value

    if not traceback:
        return None
    path = Path(option_value(train_args, "--out")).expanduser() / "elastic" / FAILURE_REPORT
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(traceback)
        return str(path)
    except OSError:
        return None


def _report_failure(train_args: list[str], why: str, started: float, traceback: str = "") -> int:
    """Print the outcome of a failed-looking job (job_outcome) and return the exit code. A run that
    finished keeps horovodrun's traceback in OUT/elastic/FAILURE_REPORT instead of printing it."""
    import sys

    report = None
    if traceback and finished_epochs(train_args, started) is not None:
        report = _keep_report(train_args, traceback)
        if report is not None:
            traceback = ""  # (else printed below instead)
    if traceback:
        sys.stderr.write(traceback)
        sys.stderr.flush()
    code, line = job_outcome(train_args, why, started, report)
    click.echo(line, err=True)
    return code


_RAY_ADDRESS = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]):(\d{1,5})$")


def ray_address(address: str) -> str:
    """Check --address: 'auto', 'local' or HOST:PORT. Raises click.UsageError naming the fix."""
    if address in ("auto", "local"):
        return address
    if address.startswith("ray://"):
        raise click.UsageError("--address ray://... (Ray Client) cannot work: Ray workers must reach this "
                               "process's Horovod rendezvous; run `hvd-abs launch ray` on a cluster node "
                               "with --address auto or HOST:PORT of the head (GCS) instead")
    m = _RAY_ADDRESS.match(address)
    if m is None or not 1 <= int(m.group(1)) <= 65535:
        raise click.UsageError(f"--address must be auto, local or HOST:PORT of the Ray head (e.g. "
                               f"10.0.0.1:6379), got {address!r}")
    return address


def probe_ray_head(address: str, timeout_s: float = 5.0) -> None:
    """For HOST:PORT, check that something listens there before Ray is asked to join it: Ray
    itself retries an unanswered address for minutes. Raises click.UsageError naming the fix."""
    import socket

    if address in ("auto", "local"):
        return
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise click.UsageError(f"no Ray head answers at --address {address} ({why}): start one there with "
                               f"`ray start --head --port {port}`, or pass --address local") from None


@command.command("ray", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--address", required=True,
              help="Ray cluster: 'auto' (the one this machine belongs to), HOST:PORT of its head, or "
                   "'local' (start one on this machine, no dashboard).")
@click.option("--min-workers", type=click.IntRange(min=1), default=1, show_default=True, help="Fewest workers to run with.")
@click.option("--max-workers", type=click.IntRange(min=1), default=8, show_default=True,
              help="Most workers; the job asks for min(max-workers, global batch / base batch).")
@click.option("--cpus-per-worker", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Ray CPUs each worker actor holds.")
@click.option("--gpus-per-worker", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Ray GPUs each worker actor holds (use with --device cuda).")
@click.option("--network-interface", default=None,
              help="NIC for Horovod's traffic (default: 'lo' when every Ray node is this machine, else the "
                   "interface holding this node's Ray IP).")
@click.option("--warm/--cold", default=True, show_default=True,
              help="Offer a joining worker's slot to the job only once the worker has imported and loaded the "
                   "data (the job goes on meanwhile), or right away (the running workers wait for it).")
@click.option("--warm-timeout", type=click.FloatRange(min=0), default=RAY_WARM_TIMEOUT_S, show_default=True,
              help="With --warm: seconds a joining worker may take to warm up before its slot is offered anyway.")
@click.option("--script", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Run this Python script as every worker (in its actor) instead of `hvd-abs train`: one that trains its own "
                   "model and data with hvd_abs.fit and reads its options with hvd_abs.parse_train_args.")
@click.argument("train_args", nargs=-1, type=click.UNPROCESSED)
def ray(address: str, min_workers: int, max_workers: int, cpus_per_worker: float, gpus_per_worker: float,
        network_interface: str | None, warm: bool, warm_timeout: float, script: str | None,
        train_args: tuple[str, ...]) -> None:
    """Run `hvd-abs train --elastic TRAIN_ARGS` (or a --script) with Ray actors as Horovod workers.

    Workers are placed by resources on the cluster's nodes; the job grows when its batch grows
    (up to --max-workers and what the cluster holds, asking the autoscaler for more) and rolls
    back and continues when a worker or node is lost. --out must be on storage this machine and
    every node share.

    Example: hvd-abs launch ray --address local --max-workers 2 -- --dataset digits --method absa --out runs/x
    """
    import time
    from pathlib import Path

    from hvd_abs.launch.horovod import option_value

    address = ray_address(address)
    train_args = out_of_resume(train_args)
    refuse_launcher_options(list(train_args), "hvd-abs launch ray", max_np_option="--max-workers")
    probe_ray_head(address)
    if max_workers < min_workers:
        raise click.BadParameter(f"--max-workers ({max_workers}) must be at least --min-workers ({min_workers})",
                                 param_hint="--max-workers")
    if cpus_per_worker == 0 and gpus_per_worker == 0:
        raise click.UsageError("a worker must hold some resource: pass --cpus-per-worker > 0 or --gpus-per-worker > 0")
    _check_train(list(train_args), load_data=address == "local", script=script)  # (a cluster's nodes hold their own data)
    out = option_value(list(train_args), "--out")
    # Actors do not run in this directory: the run directory travels as an absolute path.
    run_dir = str(Path(out).resolve())
    args = _with_option(list(train_args), "--out", run_dir)
    worker_argv = ["--elastic", "--max-np", str(max_workers), *args]

    from hvd_abs.launch.ray_executor import (RayElasticExecutor, RayExecutorError, script_worker, train_worker,
                                              warm_script_worker, warm_train_worker)

    executor = RayElasticExecutor(min_workers=min_workers, max_workers=max_workers, cpus_per_worker=cpus_per_worker,
                                  gpus_per_worker=gpus_per_worker, address=address, run_dir=run_dir,
                                  nic=network_interface, warm_timeout=warm_timeout)
    if script is None:
        work, work_args, running = train_worker, (worker_argv,), "hvd-abs train"
        warmup = functools.partial(warm_train_worker, worker_argv) if warm else None
    else:  # the actors run it from this directory (its relative paths), the path made absolute
        script = str(Path(script).resolve())
        work, work_args, running = script_worker, (script, str(Path.cwd()), worker_argv), f"python {script}"
        warmup = warm_script_worker if warm else None
    click.echo(f"+ Ray {address}: {min_workers}..{max_workers} workers x (CPU {cpus_per_worker:g}, GPU "
               f"{gpus_per_worker:g}) running {running} {' '.join(worker_argv)}", err=True)
    try:
        executor.start()
    except ConnectionError as exc:
        raise click.UsageError(f"no Ray cluster at --address {address} ({exc}): start one with "
                               f"`ray start --head`, or pass --address local") from None
    from hvd_abs.elastic.world_signal import start_job

    started = time.time()
    try:
        lock = _locked(run_dir)  # the job's, while it runs (its workers come and go)
    except click.UsageError:
        executor.shutdown()
        raise
    start_job(run_dir, min_workers)  # only once connected: a refused job leaves its --out as it was
    with lock:  # (released after the shutdown: the actors are gone by then)
        try:
            # Warm joins: a joining worker imports (and loads the data) before the job waits for it.
            executor.run(work, work_args, warmup=warmup)
        except RayExecutorError as exc:
            if exc.input_error is not None and finished_epochs(args, started) is None:
                _refused(exc.input_error)
            raise SystemExit(_report_failure(args, " ".join(str(exc).split())[:300], started)) from None
        finally:
            executor.shutdown()


def _locked(run_dir: str) -> contextlib.ExitStack:
    """The run dir's lock (hvd_abs/run_lock.py), taken now and released when the returned stack
    closes: a usage error if another run holds it."""
    from hvd_abs.errors import UserError
    from hvd_abs.locks import run_lock

    stack = contextlib.ExitStack()
    try:
        stack.enter_context(run_lock(run_dir))
    except UserError as exc:
        raise click.UsageError(str(exc)) from None
    return stack


def _with_option(args: list[str], name: str, value: str) -> list[str]:
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
