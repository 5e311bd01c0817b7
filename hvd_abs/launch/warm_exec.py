"""`python -m hvd_abs.launch.warm_exec --standby-dir D -- ARGV...`: the command horovodrun runs
for a worker slot. Hands the slot to a ready standby in D (see standby.py); with none ready,
execs ARGV (a cold start). Standard library only, so it starts in tens of milliseconds."""
from __future__ import annotations

import os
import sys


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[0] != "--standby-dir" or argv[2] != "--":
        print("usage: python -m hvd_abs.launch.warm_exec --standby-dir DIR -- ARGV...", file=sys.stderr)
        return 2
    directory, worker_argv = argv[1], argv[3:]
    from hvd_abs.launch.standby import claim, hand_off

    claimed = claim(directory)
    if claimed is None:
        os.execvp(worker_argv[0], worker_argv)  # no standby: a cold start, exactly the plain command
    pid, sock_path = claimed
    # The standby runs the worker's own entry point in-process; it gets our argv without argv[0..k]
    # that name the interpreter and module (`python -m hvd_abs`), i.e. the CLI arguments.
    cli_args = worker_argv[3:] if worker_argv[1:3] == ["-m", "hvd_abs"] else worker_argv[1:]
    return hand_off(pid, sock_path, cli_args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
