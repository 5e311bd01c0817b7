"""`python -m hvd_abs.launch.warm_exec --standby-dir D [--remote-dir R --local-hosts H,...] -- ARGV...`:
the command horovodrun runs for a worker slot. Hands the slot to a ready standby of this host
(see standby.py); with none ready, execs ARGV (a cold start). Standard library only, so it
starts in tens of milliseconds.

A slot of a remote host (HOROVOD_HOSTNAME, as the pool names it, is not one of --local-hosts)
looks in R/HOST, on its own disk, where the launcher started that host's standbys; a slot of
this machine looks in D, the run directory's."""
from __future__ import annotations

import os
import sys

USAGE = "usage: python -m hvd_abs.launch.warm_exec --standby-dir DIR [--remote-dir DIR --local-hosts H,...] -- ARGV..."


def standby_folder(options: dict[str, str], host: str | None) -> str:
    local = options.get("--local-hosts", "").split(",")
    if "--remote-dir" in options and host and host not in local:
        return f"{options['--remote-dir']}/{host}"  # (standby_pool.remote_standby_dir)
    return options["--standby-dir"]


def main(argv: list[str]) -> int:
    if "--" not in argv:
        print(USAGE, file=sys.stderr)
        return 2
    head, worker_argv = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    options = dict(zip(head[::2], head[1::2]))
    if len(head) % 2 or not worker_argv or "--standby-dir" not in options \
            or not set(options) <= {"--standby-dir", "--remote-dir", "--local-hosts"}:
        print(USAGE, file=sys.stderr)
        return 2
    from hvd_abs.launch.standby import claim, hand_off

    claimed = claim(standby_folder(options, os.environ.get("HOROVOD_HOSTNAME")))
    if claimed is None:
        os.execvp(worker_argv[0], worker_argv)  # no standby: a cold start, exactly the plain command
    pid, sock_path = claimed
    # The standby runs the worker's own entry point in-process; it gets our argv without argv[0..k]
    # that name the interpreter and module (`python -m hvd_abs`), i.e. the CLI arguments.
    cli_args = worker_argv[3:] if worker_argv[1:3] == ["-m", "hvd_abs"] else worker_argv[1:]
    return hand_off(pid, sock_path, cli_args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
