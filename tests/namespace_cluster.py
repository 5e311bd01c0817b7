"""Hosts for the multi-host tests: network namespaces on this machine, each with its own address,
its own sshd and its own disk (/srv/hvd), made by scripts/local_cluster.sh as users make one."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from conftest import REPO

SCRIPT = REPO / "scripts" / "local_cluster.sh"
BASE_ENV = "PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1"
# A collective waiting on a cut-off host fails after 15 s, not Gloo's 30: the partition tests wait on it.
GLOO_TIMEOUT_ENV = "HOROVOD_GLOO_TIMEOUT_SECONDS=15"


class Cluster:
    def __init__(self, root: Path, count: int) -> None:
        self.root = root
        done = subprocess.run(["bash", str(SCRIPT), "up", str(count), str(root)], capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0:
            pytest.fail(f"local_cluster.sh up failed:\n{done.stdout}\n{done.stderr}")
        lines = [line.split() for line in done.stdout.splitlines()]
        self.addresses = [w[2] for w in lines if w[0] == "host"]
        self.namespaces = [w[3] for w in lines if w[0] == "host"]
        self.ssh_flags = next(w[1:] for w in lines if w[0] == "ssh_flags")

    def disk(self, i: int) -> Path:
        """Host i's /srv/hvd, as seen from outside the hosts."""
        return self.root / "hosts" / f"h{i}"

    def hostfile(self, hosts: list[int], name: str = "hostfile") -> Path:
        path = self.root / name
        path.write_text("".join(f"{self.addresses[i - 1]} slots=1\n" for i in hosts))
        return path

    def run(self, i: int, argv: list[str], timeout: float, env: str = "") -> subprocess.CompletedProcess:
        """`argv` on host i (over ssh, so in its namespaces), from this checkout; `env`: more
        NAME=VALUE words for its environment."""
        command = " ".join(subprocess.list2cmdline([a]) if a else "''" for a in argv)
        env = f"{BASE_ENV} {env}"
        try:
            return subprocess.run(["bash", str(SCRIPT), "ssh", str(i), str(self.root), "--", f"{env} {command}"],
                                  capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"host {i}: {command} timed out after {timeout}s\n{exc.stdout}\n{exc.stderr}")

    def kill(self, i: int) -> None:
        """SIGKILL every process on host i, its sshd too: a lost host."""
        subprocess.run(["bash", str(SCRIPT), "kill", str(i), str(self.root)], check=True, timeout=30)

    def cut(self, i: int) -> None:
        """Take host i's link down: a partition (its processes live on)."""
        subprocess.run(["bash", str(SCRIPT), "cut", str(i), str(self.root)], check=True, timeout=30)

    def heal(self, i: int) -> None:
        subprocess.run(["bash", str(SCRIPT), "heal", str(i), str(self.root)], check=True, timeout=30)

    def close(self) -> None:
        """Remove the hosts; the jobs' and daemons' logs are kept beside the cluster folder."""
        kept = self.root.with_name(self.root.name + "-logs")
        kept.mkdir(exist_ok=True)
        for log in [*self.root.glob("*.log"), *self.root.glob("logs/*.log")]:
            shutil.copy(log, kept / log.name)
        subprocess.run(["bash", str(SCRIPT), "down", str(self.root)], capture_output=True, timeout=60)


def can_make_namespaces() -> str | None:
    """Why this machine cannot make the hosts, else None."""
    if os.geteuid() != 0:
        return "needs root to make network namespaces (CI runs these as root)"
    if shutil.which("ip") is None or shutil.which("unshare") is None:
        return "needs iproute2 and util-linux"
    return None


@contextlib.contextmanager
def hosts(tmp_path_factory, name: str, count: int = 3) -> Iterator[Cluster]:
    """A module's cluster of `count` hosts (skipped where namespaces cannot be made), removed
    after, even on failure."""
    why = can_make_namespaces()
    if why:
        pytest.skip(why)
    cluster = Cluster(tmp_path_factory.mktemp(name), count)
    try:
        yield cluster
    finally:
        cluster.close()


DIGITS = ["--dataset", "digits", "--model", "cnn", "--base-batch", "32", "--quiet", "--threads", "1",
          "--callback", "hvd_abs.testing.ledger:Ledger", "--commit-every", "1"]


class Job:
    """`argv` on host 1 in the background (the launcher, as a user's), its output in `log`."""

    def __init__(self, cluster: Cluster, argv: list[str], name: str, env: str = "") -> None:
        self.cluster, self.log = cluster, cluster.root / f"{name}.log"
        command = " ".join(subprocess.list2cmdline([a]) for a in argv)
        self.proc = subprocess.Popen(["bash", str(SCRIPT), "ssh", "1", str(cluster.root), "--",
                                      f"{BASE_ENV} {env} {command}"],
                                     stdout=open(self.log, "w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def wait_for(self, ledger: Path, text: str, limit_s: float = 240) -> None:
        """Until some rank's ledger in `ledger` (a host's disk) holds `text`."""
        deadline = time.monotonic() + limit_s
        while not any(text in f.read_text() for f in ledger.glob("rank-*.jsonl")):
            assert self.proc.poll() is None and time.monotonic() < deadline, self.output()
            time.sleep(0.05)

    def finish(self, limit_s: float = 300) -> int:
        try:
            return self.proc.wait(timeout=limit_s)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()

    def output(self) -> str:
        return self.log.read_text()[-6000:]


def merged_ledger(into: Path, *ledgers: Path) -> None:
    """The job's ledger in one folder (each host kept its ranks' own)."""
    for d in ledgers:
        for f in d.glob("*.jsonl"):
            shutil.copy(f, into / f.name)
