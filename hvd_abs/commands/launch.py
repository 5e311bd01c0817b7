"""`hvd-abs launch horovod|ray`: start elastic training and say exactly what was started.

The click commands only; what they check, rewrite and conclude is the launcher side's
(hvd_abs/launch/: args, outcome, job_lock, ray_address, horovod, ray_executor)."""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import click

from hvd_abs.errors import user_errors_exit_2
from hvd_abs.launch.discovery import WARM_TIMEOUT_S as HOROVOD_WARM_TIMEOUT_S
from hvd_abs.launch.ray_warm_pool import WARM_TIMEOUT_S as RAY_WARM_TIMEOUT_S

if TYPE_CHECKING:
    from hvd_abs.launch.hosts import Ssh


# What Horovod's elastic driver says when --reset-limit stops a job (horovod/runner/elastic/constants.py).
RESET_LIMIT_HIT = "number of resets during elastic job exceeded limit"


def _elastic_limits(command: Any) -> Any:
    """--reset-limit and --elastic-timeout, the same on both launchers."""
    command = click.option("--elastic-timeout", type=click.IntRange(min=1), default=600, show_default=True,
                           help="Seconds the job waits, after a reset, for at least its fewest workers before it "
                                "stops.")(command)
    return click.option("--reset-limit", type=click.IntRange(min=0), default=None,
                        help="Stop the job after this many elastic resets (each join, leave or failure is one; the "
                             "batch's growth adds workers, so count those in). Default: no limit.")(command)


@click.group("launch")
def command() -> None:
    """Launch elastic training through horovodrun or on a Ray cluster."""


@command.command("horovod", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--min-np", type=click.IntRange(min=1), default=1, show_default=True, help="Fewest workers to run with.")
@click.option("--max-np", type=click.IntRange(min=1), default=4, show_default=True,
              help="Most workers; the job asks for min(max-np, global batch / base batch).")
@click.option("--hostfile", type=click.Path(exists=True, dir_okay=False),
              help="Host pool, one 'HOST slots=N' line per host (default: localhost with max-np slots).")
@click.option("--network-interface", default=None,
              help="NIC for Horovod's traffic (default: 'lo' when every host is this machine, else the interface "
                   "that reaches the hostfile's other hosts). Every host must have it.")
@click.option("--ssh-port", type=click.IntRange(1, 65535), default=None, help="ssh port of the remote hosts.")
@click.option("--ssh-identity-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="ssh private key for the remote hosts.")
@click.option("--ssh-option", multiple=True, metavar="OPTION",
              help="An ssh -o option for every connection to the remote hosts (repeatable), e.g. "
                   "UserKnownHostsFile=FILE.")
@click.option("--start-timeout", type=click.IntRange(min=1), default=30, show_default=True,
              help="Seconds for checking the remote hosts and for horovodrun's own start checks.")
@click.option("--blacklist-cooldown", default="5,30", show_default=True,
              help="Seconds MIN,MAX before a host whose worker failed may be used again ('' = never).")
@click.option("--warm", type=click.IntRange(min=0), default=1, show_default=True,
              help="Keep this many pre-started, pre-imported standby workers ready for the next slots, on the "
                   "hosts those slots go to (over ssh for a remote one); growth adds a slot only as its standby "
                   "is ready, so joins skip the cold start (with --script, the imports: the script still loads "
                   "its data at the join). 0: cold joins.")
@click.option("--warm-timeout", type=click.FloatRange(min=0), default=HOROVOD_WARM_TIMEOUT_S, show_default=True,
              help="With --warm: seconds growth waits for ready standbys before adding the slots cold.")
@click.option("--script", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Run this Python script as every worker instead of `hvd-abs train`: one that trains its own "
                   "model and data with hvd_abs.fit and reads its options with hvd_abs.parse_train_args.")
@_elastic_limits
@click.option("--dry-run", is_flag=True, help="Print the horovodrun command without running it.")
@click.argument("train_args", nargs=-1, type=click.UNPROCESSED)
def horovod(min_np: int, max_np: int, hostfile: str | None, network_interface: str | None, ssh_port: int | None,
            ssh_identity_file: str | None, ssh_option: tuple[str, ...], start_timeout: int, blacklist_cooldown: str,
            warm: int, warm_timeout: float, script: str | None, reset_limit: int | None, elastic_timeout: int,
            dry_run: bool, train_args: tuple[str, ...]) -> None:
    """Build, print and run the elastic horovodrun command for `hvd-abs train TRAIN_ARGS`
    (or for `python SCRIPT TRAIN_ARGS` with --script).

    Example: hvd-abs launch horovod --min-np 1 --max-np 2 -- --dataset digits --method absa --out runs/x
    """
    import contextlib
    import os
    import shlex
    import signal
    import sys
    import time
    from pathlib import Path

    from hvd_abs.launch.args import check_hostfile, config_inlined, out_of_resume, refuse_launcher_options
    from hvd_abs.launch.discovery import local_pool
    from hvd_abs.launch.horovod import Refusals, build_command
    from hvd_abs.launch.hosts import Ssh, SshMasters
    from hvd_abs.launch.standby_pool import StandbyPool, new_remote_dir

    if max_np < min_np:
        raise click.BadParameter(f"--max-np ({max_np}) must be at least --min-np ({min_np})", param_hint="--max-np")
    train_args = out_of_resume(config_inlined(train_args, script=script is not None))
    refuse_launcher_options(list(train_args), "hvd-abs launch horovod", max_np_option="--max-np")
    pool = check_hostfile(hostfile, min_np) if hostfile else []
    _check_train(list(train_args), load_data=hostfile is None, script=script)  # (else the data lives on the hosts)
    ssh = Ssh(ssh_port, ssh_identity_file and str(Path(ssh_identity_file).resolve()), list(ssh_option))
    remote, nic, bind = _hosts(pool, network_interface, ssh, list(train_args), start_timeout, check=not dry_run)
    remote_dir = new_remote_dir()
    standby_hosts = (remote_dir, [h for h, _ in pool if h not in remote]) if warm and remote else None
    # (no processes until ensure(); a dry run shows the command without the shared connections)
    masters = SshMasters(ssh) if remote and not dry_run and SshMasters.wanted(ssh) else None
    job_ssh = masters.ssh if masters else ssh
    try:
        cmd = build_command(list(train_args), min_np=min_np, max_np=max_np, hostfile=hostfile,
                            nic=nic, cooldown=blacklist_cooldown, warm=warm > 0,
                            warm_timeout=warm_timeout, script=script, ssh=job_ssh, across_hosts=bool(remote),
                            start_timeout=start_timeout if remote else None, remote_standbys=standby_hosts,
                            reset_limit=reset_limit, elastic_timeout=elastic_timeout)
    except ValueError as exc:
        if masters:
            masters.close()
        raise click.UsageError(str(exc)) from None
    click.echo("+ " + shlex.join(cmd), err=True)
    if dry_run:
        return
    from hvd_abs.comm import SEPARATE_HOSTS_ENV
    from hvd_abs.elastic.world_signal import start_job
    from hvd_abs.launch.args import resume_of
    from hvd_abs.launch.horovod import Terminated, run_dir_of, run_horovodrun, stop_on_termination
    from hvd_abs.launch.job_lock import locked
    from hvd_abs.launch.job_service import JobService
    from hvd_abs.launch.outcome import finished_epochs, keep_report, report_failure

    started = time.time()
    run_dir = run_dir_of(list(train_args))
    held: list[str] = []  # horovodrun's own traceback, kept out of the output until the outcome is known
    refusals = Refusals()  # workers' "Error: ..." lines (a refused input, exit 2) and exit codes
    standbys = StandbyPool(run_dir, pool or local_pool(max_np), keep=warm, max_np=max_np, min_np=min_np,
                           standby_args=["train", "--elastic", "--max-np", str(max_np), *train_args],
                           script=script is not None, python=sys.executable, env=None,
                           ssh=Ssh(job_ssh.port, job_ssh.identity_file, job_ssh.worker_options()),
                           remote_dir=remote_dir, hostfile=hostfile, timeout_s=start_timeout, masters=masters)
    try:
        lock = locked(run_dir)  # the job's, while it runs (its workers come and go)
        start_job(run_dir, min_np)
        for host, slots in pool if masters else []:
            if host in remote:
                masters.ensure(host, slots)
        # The job's workers reach this launcher through its job service, from any host.
        resume, in_place = resume_of(list(train_args), run_dir)
        with lock, JobService(run_dir, bind, resume=resume, in_place=in_place) as service, stop_on_termination():
            standbys.env = env = {**os.environ, **service.env(), **({SEPARATE_HOSTS_ENV: "1"} if remote else {})}
            with standbys if warm else contextlib.nullcontext():  # (--warm 0: cold joins)
                code = run_horovodrun(cmd, held, refusals, env)
    except Terminated as stop:
        name = signal.Signals(stop.signum).name
        click.echo(f"hvd-abs launch horovod: {name} received: the job was stopped (its workers and standbys "
                   f"too); continue it with -- --resume {run_dir} (from its newest "
                   f"checkpoint, if it wrote one)", err=True)
        sys.exit(128 + stop.signum)
    finally:
        if masters:
            masters.close()
    refused = refusals.outcome() if code != 0 else None
    if refused is not None and finished_epochs(list(train_args), started) is None:
        keep_report(list(train_args), "".join(held))
        _refused(refused)
    if code != 0:
        why = f"horovodrun exited {code}"
        if RESET_LIMIT_HIT in "".join(held):  # (Horovod's own words; its traceback goes to the report file)
            keep_report(list(train_args), "".join(held))
            held = []
            why = f"it stopped at --reset-limit {reset_limit}: each join, leave or failure is a reset; raise the limit"
        code = report_failure(list(train_args), why, started, "".join(held))
    elif held:  # (a traceback and exit 0: never seen; show it rather than drop it)
        sys.stderr.write("".join(held))
    sys.exit(code)


@user_errors_exit_2
def _hosts(pool: list[tuple[str, int]], nic: str | None, ssh: "Ssh", train_args: list[str], timeout_s: int,
           check: bool) -> tuple[list[str], str, str]:
    """hvd_abs.launch.hosts.plan_hosts, each problem said in one line naming its host, exit 2."""
    import sys

    from hvd_abs.errors import UserError
    from hvd_abs.launch.horovod import option_value
    from hvd_abs.launch.hosts import HostError, plan_hosts

    try:
        remote, nic, bind, problems = plan_hosts(pool, nic, ssh, sys.executable, option_value(train_args, "--data-dir"),
                                                 timeout_s, check)
    except HostError as exc:
        raise UserError(str(exc)) from None
    for line in problems[:-1]:
        click.echo(f"Error: {line}", err=True)
    if problems:
        raise UserError(problems[-1])
    return remote, nic, bind


@user_errors_exit_2
def _check_train(train_args: list[str], load_data: bool, script: str | None = None) -> None:
    """hvd_abs.launch.args.check_train, its UserError (a bad option or data set) said in one line
    with exit 2."""
    from hvd_abs.launch.args import check_train

    check_train(train_args, load_data=load_data, script=script)


def _refused(message: str) -> None:
    """A worker refused its input (bad options or data, said in one line, exit 2): that is the
    job's outcome too, not a failure a rerun or --resume would get past. Exits 2."""
    from hvd_abs.errors import exit_2

    exit_2(f"a worker refused its input: {message}")


@command.command("ray", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--address", envvar="RAY_ADDRESS", required=True,
              help="Ray cluster: 'auto' (the one this machine belongs to), HOST:PORT of its head, or "
                   "'local' (start one on this machine, no dashboard). Default: $RAY_ADDRESS.")
@click.option("--min-workers", type=click.IntRange(min=1), default=1, show_default=True, help="Fewest workers to run with.")
@click.option("--max-workers", type=click.IntRange(min=1), default=8, show_default=True,
              help="Most workers; the job asks for min(max-workers, global batch / base batch).")
@click.option("--cpus-per-worker", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Ray CPUs each worker actor holds.")
@click.option("--gpus-per-worker", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Ray GPUs each worker actor holds (use with --device cuda).")
@click.option("--network-interface", default=None,
              help="NIC for Horovod's traffic (default: the interface holding this node's Ray IP, the way "
                   "Ray's traffic goes; 'lo' with --address local).")
@click.option("--warm/--cold", default=True, show_default=True,
              help="Offer a joining worker's slot to the job only once the worker has imported and loaded the "
                   "data (the job goes on meanwhile), or right away (the running workers wait for it).")
@click.option("--warm-timeout", type=click.FloatRange(min=0), default=RAY_WARM_TIMEOUT_S, show_default=True,
              help="With --warm: seconds a joining worker may take to warm up before its slot is offered anyway.")
@click.option("--script", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Run this Python script as every worker (in its actor) instead of `hvd-abs train`: one that trains its own "
                   "model and data with hvd_abs.fit and reads its options with hvd_abs.parse_train_args.")
@_elastic_limits
@click.argument("train_args", nargs=-1, type=click.UNPROCESSED)
def ray(address: str, min_workers: int, max_workers: int, cpus_per_worker: float, gpus_per_worker: float,
        network_interface: str | None, warm: bool, warm_timeout: float, script: str | None, reset_limit: int | None,
        elastic_timeout: int, train_args: tuple[str, ...]) -> None:
    """Run `hvd-abs train --elastic TRAIN_ARGS` (or a --script) with Ray actors as Horovod workers.

    Workers are placed by resources on the cluster's nodes; the job grows when its batch grows
    (up to --max-workers and what the cluster holds, asking the autoscaler for more) and rolls
    back and continues when a worker or node is lost. The run's outputs are written into --out on
    this machine, whichever node rank 0 is on; each node needs the data itself.

    Example: hvd-abs launch ray --address local --max-workers 2 -- --dataset digits --method absa --out runs/x
    """
    import time
    from pathlib import Path

    from hvd_abs.launch.args import config_inlined, out_of_resume, refuse_launcher_options, resume_of, with_option
    from hvd_abs.launch.horovod import option_value
    from hvd_abs.launch.ray_address import probe_ray_head, ray_address

    address = ray_address(address)
    train_args = out_of_resume(config_inlined(train_args, script=script is not None))
    refuse_launcher_options(list(train_args), "hvd-abs launch ray", max_np_option="--max-workers")
    probe_ray_head(address)
    if max_workers < min_workers:
        raise click.BadParameter(f"--max-workers ({max_workers}) must be at least --min-workers ({min_workers})",
                                 param_hint="--max-workers")
    if cpus_per_worker == 0 and gpus_per_worker == 0:
        raise click.UsageError("a worker must hold some resource: pass --cpus-per-worker > 0 or --gpus-per-worker > 0")
    if option_value(list(train_args), "--device") == "cuda" and gpus_per_worker == 0:
        raise click.UsageError("--device cuda needs a GPU per worker actor: pass --gpus-per-worker 1 (or a share "
                               "of one, e.g. 0.5)")
    _check_train(list(train_args), load_data=address == "local", script=script)  # (a cluster's nodes hold their own data)
    out = option_value(list(train_args), "--out")
    # Actors do not run in this directory: the run directory travels as an absolute path.
    run_dir = str(Path(out).resolve())
    args = with_option(list(train_args), "--out", run_dir)
    resume, in_place = resume_of(args, run_dir)
    if resume:
        args = with_option(args, "--resume", resume)
    worker_argv = ["--elastic", "--max-np", str(max_workers), *args]

    from hvd_abs.launch.ray_executor import (RayAuthError, RayElasticExecutor, RayExecutorError, script_worker,
                                              train_worker, warm_script_worker, warm_train_worker)

    executor = RayElasticExecutor(min_workers=min_workers, max_workers=max_workers, cpus_per_worker=cpus_per_worker,
                                  gpus_per_worker=gpus_per_worker, address=address, run_dir=run_dir,
                                  nic=network_interface, warm_timeout=warm_timeout, reset_limit=reset_limit,
                                  elastic_timeout=elastic_timeout)
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
    except RayAuthError as exc:
        from hvd_abs.errors import exit_2

        exit_2(str(exc))
    except ConnectionError as exc:
        raise click.UsageError(f"no Ray cluster at --address {address} ({exc}): start one with "
                               f"`ray start --head`, or pass --address local") from None
    from hvd_abs.comm import SEPARATE_HOSTS_ENV
    from hvd_abs.elastic.world_signal import start_job
    from hvd_abs.launch.job_lock import locked
    from hvd_abs.launch.job_service import JobService
    from hvd_abs.launch.outcome import finished_epochs, report_failure

    started = time.time()
    try:
        lock = locked(run_dir)  # the job's, while it runs (its workers come and go)
    except click.UsageError:
        executor.shutdown()
        raise
    start_job(run_dir, min_workers)  # only once connected: a refused job leaves its --out as it was
    # The workers reach this launcher through its job service from any node: the world size
    # they want, the run's outputs (written here), --resume's checkpoint.
    service = JobService(run_dir, executor.driver_address, resume=resume, in_place=in_place)
    executor.env.update(service.env())
    if executor.spans_machines:
        executor.env[SEPARATE_HOSTS_ENV] = "1"  # (threads per worker from the workers on its node)
    with lock, service:  # (released after the shutdown: the actors are gone by then)
        try:
            # Warm joins: a joining worker imports (and loads the data) before the job waits for it.
            executor.run(work, work_args, warmup=warmup)
        except RayExecutorError as exc:
            if exc.input_error is not None and finished_epochs(args, started) is None:
                _refused(exc.input_error)
            raise SystemExit(report_failure(args, " ".join(str(exc).split())[:300], started)) from None
        finally:
            executor.shutdown()
