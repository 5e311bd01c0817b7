"""The hosts of a horovodrun pool as the launcher sees them: which are this machine, the network
interface that reaches the others, how to ssh to them, and a check of each remote host before
anything starts (ssh, the environment at the launcher's path, the interface, the data), so a
bad host is one line naming it and the fix instead of a hang or a dead job."""
from __future__ import annotations

import json
import shlex
import socket
import subprocess
import threading
from dataclasses import dataclass, field


def local_addresses() -> dict[str, str]:
    """This machine's IPv4 addresses -> the interface holding each."""
    import psutil  # (Horovod's dependency: what horovodrun itself reads)

    return {a.address: nic for nic, addrs in psutil.net_if_addrs().items() for a in addrs
            if a.family == socket.AF_INET}


def resolve(host: str) -> str | None:
    try:
        return socket.gethostbyname(host)
    except OSError:
        return None


def remote_hosts(hosts: list[str]) -> list[str]:
    """The hosts that are not this machine, as Horovod decides it (by resolved address)."""
    mine = local_addresses()
    return [h for h in hosts if resolve(h) not in mine and not (resolve(h) or "").startswith("127.")]


class HostError(ValueError):
    """A host the job cannot use: the message names the host and the fix."""


def interface_towards(host: str) -> str:
    """The interface this machine's traffic to `host` leaves by (the kernel's route to it)."""
    address = resolve(host)
    if address is None:
        raise HostError(f"host {host}: its name does not resolve; use its address or fix its name")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((address, 9))  # (UDP: sends nothing, only asks the route)
        except OSError as exc:
            raise HostError(f"host {host}: no route from this machine ({exc.strerror})") from None
        source = probe.getsockname()[0]
    nic = local_addresses().get(source)
    if nic is None:
        raise HostError(f"host {host}: no interface found for this machine's address {source}; "
                        f"pass --network-interface")
    return nic


def choose_interface(hosts: list[str], given: str | None) -> str:
    """--network-interface as given; else `lo` when every host is this machine, else the
    interface that reaches the first remote host (Horovod uses one interface for all traffic)."""
    if given:
        return given
    remote = remote_hosts(hosts)
    return interface_towards(remote[0]) if remote else "lo"


def interface_address(nic: str) -> str:
    """The IPv4 address of this machine on `nic` (where the launcher's job service listens)."""
    for address, owner in local_addresses().items():
        if owner == nic:
            return address
    raise HostError(f"--network-interface {nic}: this machine has no IPv4 address on it; "
                    f"pick one of {', '.join(sorted(set(local_addresses().values())))}")


KEEPALIVE = ("ServerAliveInterval=5", "ServerAliveCountMax=3")


@dataclass
class Ssh:
    """How the launcher and horovodrun reach the remote hosts (horovodrun's -p and -i, plus
    ssh -o options)."""
    port: int | None = None
    identity_file: str | None = None
    options: list[str] = field(default_factory=list)

    def worker_options(self) -> list[str]:
        """The -o options of the workers' ssh sessions: the user's, plus keep-alives unless the
        user set them. A host cut off mid-job then ends its session within 15 s (a failed
        worker: its host is barred until the cooldown, and rejoins after it) instead of when
        TCP gives up, many minutes later, with the job waiting for it."""
        given = {o.split("=", 1)[0].strip().lower() for o in self.options}
        return [*self.options, *(o for o in KEEPALIVE if o.split("=", 1)[0].lower() not in given)]

    def argv(self, host: str, command: str, timeout_s: float) -> list[str]:
        argv = ["ssh", "-o", "PasswordAuthentication=no", "-o", "StrictHostKeyChecking=no", "-o", "BatchMode=yes",
                "-o", f"ConnectTimeout={max(1, int(timeout_s))}"]
        for option in self.options:
            argv += ["-o", option]
        if self.port is not None:
            argv += ["-p", str(self.port)]
        if self.identity_file:
            argv += ["-i", self.identity_file]
        return argv + [host, command]

    def horovodrun_args(self) -> list[str]:
        args = ["--ssh-port", str(self.port)] if self.port is not None else []
        return args + (["--ssh-identity-file", self.identity_file] if self.identity_file else [])


class SshMasters:
    """One ssh connection per remote host that the job's later ssh sessions to it share
    (OpenSSH's ControlMaster): a worker or standby started over ssh then skips the key exchange
    (0.35 s against 0.13 s here), which a join's survivors would wait for.

    The masters are this launcher's children (`ssh -M -N`), stopped by close(): not
    ControlPersist ones, which fork into the background holding the caller's stderr. A session
    finds its host's master by `ControlPath` in `ssh`'s options and connects directly when
    there is none. sshd's MaxSessions (10 by default) caps the sessions of one connection, so a
    host of more than MAX_SHARED slots gets no master."""

    MAX_SHARED = 8  # its slots' workers and a standby or two stay within MaxSessions 10

    def __init__(self, ssh: Ssh) -> None:
        import tempfile

        self.dir = tempfile.mkdtemp(prefix="hvd_abs-ssh-")  # (mode 0700: the sockets are this user's)
        self.ssh = Ssh(ssh.port, ssh.identity_file, [*ssh.options, f"ControlPath={self.dir}/%C"])
        self.masters: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()

    @staticmethod
    def wanted(ssh: Ssh) -> bool:
        """False when the user's own options already choose connection sharing."""
        return not any(o.split("=", 1)[0].strip().lower() in ("controlpath", "controlmaster") for o in ssh.options)

    def ensure(self, host: str, slots: int = 1) -> None:
        """A running master for `host` (started again if its connection ended, e.g. cut off)."""
        if slots > self.MAX_SHARED:
            return
        with self._lock:
            master = self.masters.get(host)
            if master is None or master.poll() is not None:
                keepalive = Ssh(self.ssh.port, self.ssh.identity_file, self.ssh.worker_options())
                argv = keepalive.argv(host, "", 30)[:-2]
                argv += ["-o", "ControlMaster=yes", "-o", "ControlPersist=no", "-N", host]
                self.masters[host] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                                      stderr=subprocess.DEVNULL)

    def close(self) -> None:
        import shutil

        for master in self.masters.values():
            master.terminate()
        for master in self.masters.values():
            try:
                master.wait(timeout=10)
            except subprocess.TimeoutExpired:
                master.kill()
                master.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


# Run on each remote host by its own python: what a worker there needs, as JSON.
_CHECK = """
import importlib.util, json, os, socket, sys
nic, data = sys.argv[1], sys.argv[2]
try:
    import psutil
    nics = {n: [a.address for a in addrs if a.family == socket.AF_INET] for n, addrs in psutil.net_if_addrs().items()}
except ImportError:
    nics = None
print(json.dumps({"missing": [m for m in ("torch", "horovod", "hvd_abs") if importlib.util.find_spec(m) is None],
                  "nic": None if nics is None else bool(nics.get(nic)), "nics": sorted(nics or {}),
                  "data": (not data) or os.path.isdir(data)}))
"""


def check_host(host: str, ssh: Ssh, python: str, nic: str, data_dir: str | None, timeout_s: float) -> str | None:
    """What stops `host` from running a worker (one line naming it and the fix), or None."""
    command = (f"test -x {shlex.quote(python)} || {{ echo NO-PYTHON; exit 0; }}; "
               f"{shlex.quote(python)} -c {shlex.quote(_CHECK)} {shlex.quote(nic)} {shlex.quote(data_dir or '')}")
    try:
        done = subprocess.run(ssh.argv(host, command, timeout_s), capture_output=True, text=True, timeout=timeout_s,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return f"host {host}: no answer over ssh within {timeout_s:g} s; check that `ssh {host}` works from here"
    if done.returncode == 255:
        why = (done.stderr.strip().splitlines() or ["ssh failed"])[-1]
        return f"host {host}: ssh failed ({why}); check --ssh-port, --ssh-identity-file and that sshd runs there"
    lines = done.stdout.strip().splitlines()
    if lines[-1:] == ["NO-PYTHON"]:
        return (f"host {host}: no {python} there; install the same environment at the same path on every host "
                f"(workers run the launcher's Python)")
    try:
        found = json.loads(lines[-1])
    except (IndexError, ValueError):
        return f"host {host}: {python} failed there: {(done.stderr.strip().splitlines() or ['no output'])[-1]}"
    if found["missing"]:
        return f"host {host}: {python} there lacks {', '.join(found['missing'])}; install the same environment there"
    if found["nic"] is False:
        return (f"host {host}: no IPv4 address on interface {nic} there (it has {', '.join(found['nics'])}); "
                f"pass the --network-interface every host shares")
    if not found["data"]:
        return f"host {host}: no data folder {data_dir} there; copy the data set to that path on every host"
    return None


def check_hosts(hosts: list[str], ssh: Ssh, python: str, nic: str, data_dir: str | None,
                timeout_s: float) -> list[str]:
    """check_host on every host at once (so the whole check takes one timeout at most)."""
    problems: dict[str, str | None] = {}

    def one(host: str) -> None:
        problems[host] = check_host(host, ssh, python, nic, data_dir, timeout_s)

    threads = [threading.Thread(target=one, args=(h,), daemon=True) for h in dict.fromkeys(hosts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s + 5)
    unanswered = f"no answer within {timeout_s:g} s"
    return [problems[h] if h in problems else f"host {h}: {unanswered}" for h in dict.fromkeys(hosts)
            if problems.get(h, unanswered) is not None]


def plan_hosts(pool: list[tuple[str, int]], nic: str | None, ssh: Ssh, python: str, data_dir: str | None,
               timeout_s: float, check: bool) -> tuple[list[str], str, str, list[str]]:
    """For a pool: its remote hosts, the interface for Horovod, the address the launcher's job
    service listens on, and (with `check`) what stops each remote host from running a worker.
    Raises HostError for a choice of interface that cannot work."""
    hosts = [h for h, _ in pool]
    remote = remote_hosts(hosts)
    nic = choose_interface(hosts, nic)
    bind = "127.0.0.1" if nic == "lo" else interface_address(nic)
    if remote and nic == "lo":
        raise HostError(f"--network-interface lo cannot reach {remote[0]}: drop it (the interface is found from "
                        f"the hostfile) or name one every host has")
    problems = check_hosts(remote, ssh, python, nic, data_dir, timeout_s) if check and remote else []
    return remote, nic, bind, problems
