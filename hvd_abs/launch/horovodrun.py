"""horovodrun for a job whose pool reaches beyond this machine: Horovod's own launcher, run in
this process with two adjustments (`python -m hvd_abs.launch.horovodrun [--ssh-option O]... --
HOROVODRUN_ARGS`).

1. The network interface given (--network-interface) is used as given. Horovod 0.28.1 checks
   only the hosts of the *first* host set: when they are all this machine (the launcher's host,
   before any growth) it insists on an interface holding 127.0.0.1 and hands workers a
   rendezvous address on it, which a host that joins later cannot reach.
2. `--ssh-option` adds `-o OPTION` to every ssh command Horovod runs (e.g. a known-hosts file
   of a test cluster), as horovodrun has only a port and an identity file.
"""
from __future__ import annotations

import argparse
import sys


def _given_interfaces(settings, all_host_names, remote_host_names=None, fn_cache=None):  # noqa: ANN001
    return list(settings.nics)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hvd_abs.launch.horovodrun", description=__doc__.splitlines()[0])
    p.add_argument("--ssh-option", action="append", default=[], metavar="OPTION",
                   help="an ssh -o option for every ssh command Horovod runs, e.g. UserKnownHostsFile=FILE")
    p.add_argument("horovodrun_args", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    rest = args.horovodrun_args[1:] if args.horovodrun_args[:1] == ["--"] else args.horovodrun_args
    if "--network-interface" not in rest and "--network-interfaces" not in rest:
        print("hvd_abs.launch.horovodrun: pass --network-interface IFACE (the interface every host shares)",
              file=sys.stderr)
        return 2

    from horovod.runner import launch
    from horovod.runner.driver import driver_service
    from horovod.runner.util import remote

    driver_service.get_common_interfaces = _given_interfaces
    for option in args.ssh_option:
        remote.SSH_COMMAND_PREFIX += f" -o {option}"
    sys.argv = ["horovodrun", *rest]
    launch.run_commandline()
    return 0


if __name__ == "__main__":
    sys.exit(main())
