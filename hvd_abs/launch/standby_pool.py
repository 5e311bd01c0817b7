"""The launcher's warm standbys for horovodrun, kept on the hosts the next slots go to.

Discovery grows the job in pool order (discovery.select_hosts), so the host of each next slot is
known ahead. The pool keeps `keep` standbys (standby.py) for those slots, on this machine or over
ssh on a remote host, and writes `ready.json` beside them: how many are ready and how many were
claimed on each machine, and which machine each pool host is. Discovery advertises a new slot
only where a ready standby will take it (discovery._warm_cap).

A standby says `ready` and `claimed` on its stdout, which reaches this pool through ssh as
through a local pipe; its stdin is the pool's pipe, and it exits when that closes, so a launcher
that dies leaves no standby behind on any host.
"""
from __future__ import annotations

import collections
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from hvd_abs.atomic import write_text_atomic
from hvd_abs.launch.hosts import Ssh, SshMasters, remote_hosts
from hvd_abs.launch.standby import READY_WORD, CLAIMED_WORD, standby_dir

LOCAL = "local"
RETRY_S = 10.0  # after a standby died unclaimed, before another is started on its machine  # the machine key of this machine's standbys (every local name of the pool)


def ready_path(run_dir: str | os.PathLike) -> Path:
    return standby_dir(run_dir) / "ready.json"


def new_remote_dir() -> str:
    """A folder name for this job's standbys on remote hosts (each host has its own /tmp)."""
    import secrets

    return f"/tmp/hvd_abs-standby-{secrets.token_hex(6)}"


def remote_standby_dir(remote_dir: str, host: str) -> str:
    """Where the standbys for `host` wait, on that host (a per-job folder on its own disk)."""
    return f"{remote_dir}/{host}"


def pool_slots(pool: list[tuple[str, int]]) -> list[str]:
    """The pool's slots in the order discovery fills them: one host name per slot."""
    return [host for host, slots in pool for _ in range(slots)]


@dataclass
class _Standby:
    proc: subprocess.Popen
    machine: str
    state: str = "starting"  # -> ready -> claimed, or gone


class StandbyPool:
    """Within: keep standbys ready for the next `keep` slots after the advertised ones (at most
    max_np slots), replacing each one a slot claims; all of them are stopped on leaving.

    pool: the host pool, re-read from `hostfile` while the job runs (hosts may come and go).
    standby_args: what a standby runs after `--` (`train --elastic ...`, or nothing with
    script=True). remote_dir: the per-job folder for standbys on remote hosts. masters: the
    job's shared ssh connections, one made for a remote host before a standby starts there."""

    def __init__(self, run_dir: Path, pool: list[tuple[str, int]], *, keep: int, max_np: int, min_np: int,
                 standby_args: list[str], script: bool, python: str, env: dict[str, str] | None,
                 ssh: Ssh, remote_dir: str, hostfile: str | None = None, timeout_s: float = 30,
                 masters: SshMasters | None = None) -> None:
        self.run_dir, self.pool, self.hostfile = run_dir, pool, hostfile
        self.keep, self.max_np, self.min_np = keep, max_np, min_np
        self.standby_args, self.script, self.python, self.env = standby_args, script, python, env
        self.ssh, self.remote_dir, self.timeout_s, self.masters = ssh, remote_dir, timeout_s, masters
        self.standbys: list[_Standby] = []
        self._machine_of: dict[str, str] = {}
        self._retry_at: dict[str, float] = {}  # machine -> when to try again after a standby died there
        self._done = threading.Event()
        self._written: str | None = None
        self._thread = threading.Thread(target=self._supervise, daemon=True, name="hvd_abs-standbys")

    def machine(self, host: str) -> str:
        if host not in self._machine_of:
            self._machine_of[host] = host if remote_hosts([host]) else LOCAL
        return self._machine_of[host]

    def command(self, machine: str) -> list[str]:
        """The argv that starts one standby on `machine` (over ssh for a remote host)."""
        directory = str(standby_dir(self.run_dir)) if machine == LOCAL else remote_standby_dir(self.remote_dir, machine)
        standby = [self.python, "-m", "hvd_abs.launch.standby", "--dir", directory, "--until-stdin-closes",
                   *(["--script"] if self.script else []), "--", *([] if self.script else self.standby_args)]
        if machine == LOCAL:
            return standby
        return self.ssh.argv(machine, f"cd {shlex.quote(os.getcwd())} && exec {shlex.join(standby)}", self.timeout_s)

    def __enter__(self) -> "StandbyPool":
        standby_dir(self.run_dir).mkdir(parents=True, exist_ok=True)
        self._publish()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        for s in self.standbys:  # unclaimed ones have nothing left to do; claimed ones ended with horovodrun
            if s.proc.poll() is None:
                s.proc.terminate()
        for s in self.standbys:  # gone when the launcher returns, not some seconds later
            try:
                s.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                s.proc.kill()
                s.proc.wait()
        self._remove_remote_folders()

    def _remove_remote_folders(self) -> None:
        """The job's standby folders on the remote hosts (claim files, and the files of a
        standby that left without its cleanup), removed at once on every host."""
        hosts = sorted({s.machine for s in self.standbys} - {LOCAL})
        removers = [subprocess.Popen(self.ssh.argv(h, f"rm -rf {shlex.quote(remote_standby_dir(self.remote_dir, h))}; "
                                                      f"rmdir {shlex.quote(self.remote_dir)} 2>/dev/null; true", 5),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    for h in hosts]
        for r in removers:
            try:
                r.wait(timeout=10)
            except subprocess.TimeoutExpired:  # (a host cut off: its folder stays, in its /tmp)
                r.kill()
                r.wait()

    def _supervise(self) -> None:
        while not self._done.wait(0.25):
            self._refresh_pool()
            wanted = collections.Counter(self.machine(h) for h in self._next_slots())
            for machine, count in wanted.items():
                waiting = sum(1 for s in self.standbys if s.machine == machine and s.state in ("starting", "ready"))
                if time.monotonic() < self._retry_at.get(machine, 0.0):
                    continue
                for _ in range(count - waiting):
                    if len(self.standbys) < 2 * self.max_np:  # (bounds a standby that keeps failing)
                        self._spawn(machine)
            self._publish()

    def _refresh_pool(self) -> None:
        if not self.hostfile:
            return
        from hvd_abs.launch.discovery import HostfileError, parse_hostfile

        try:
            self.pool = parse_hostfile(Path(self.hostfile).read_text(), self.hostfile)
        except (OSError, HostfileError):
            pass  # discovery says what is wrong with it; keep the last good pool

    def _next_slots(self) -> list[str]:
        try:
            advertised = int(json.loads((self.run_dir / "elastic" / "advertised.json").read_text())["advertised"])
        except (OSError, ValueError, KeyError, TypeError):
            advertised = self.min_np
        return pool_slots(self.pool)[advertised:min(advertised + self.keep, self.max_np)]

    def _spawn(self, machine: str) -> None:
        if machine != LOCAL and self.masters is not None:
            self.masters.ensure(machine, dict(self.pool).get(machine, 1))
        proc = subprocess.Popen(self.command(machine), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                env=self.env, text=True)
        standby = _Standby(proc, machine)
        self.standbys.append(standby)
        threading.Thread(target=self._follow, args=(standby,), daemon=True, name="hvd_abs-standby-out").start()

    def _follow(self, standby: _Standby) -> None:
        """Track the standby's state from its stdout; pass its other lines to stderr."""
        for line in standby.proc.stdout:
            word = line.strip()
            if word == READY_WORD and standby.state == "starting":
                standby.state = "ready"
            elif word == CLAIMED_WORD:
                standby.state = "claimed"
                where = "this machine" if standby.machine == LOCAL else f"host {standby.machine}"
                print(f"hvd-abs launch horovod: a slot on {where} went to a warm standby", file=sys.stderr, flush=True)
            else:
                sys.stderr.write(line)
        if standby.state != "claimed":
            standby.state = "gone"
            # (a host cut off or down: its slot joins cold, rather than ssh tried twice a second)
            self._retry_at[standby.machine] = time.monotonic() + RETRY_S

    def _publish(self) -> None:
        """ready.json for discovery, rewritten only when it changes."""
        ready = collections.Counter(s.machine for s in self.standbys if s.state == "ready")
        claimed = collections.Counter(s.machine for s in self.standbys if s.state == "claimed")
        text = json.dumps({"ready": dict(ready), "claimed": dict(claimed),
                           "machine": {h: self.machine(h) for h, _ in self.pool}}, sort_keys=True)
        if text != self._written:
            write_text_atomic(ready_path(self.run_dir), text)
            self._written = text
