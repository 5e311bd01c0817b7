"""Shared helpers for tests that start real processes (horovodrun, Ray) from pytest."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv running pytest holds horovodrun and hvd-abs
WORKERS = Path(__file__).resolve().parent / "workers"
sys.path.insert(0, str(WORKERS))
from ray_fake_nodes import FakeClusterError, FakeRayCluster  # noqa: E402

# Ray of the one-machine tests on loopback (node IP 127.0.0.1, a Linux switch of Ray's): its
# traffic, and Horovod's, which follows Ray's node IP, stay on lo. The namespace hosts of the
# multi-host tests are started over ssh, with their own environment.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Ray runs its workers at nice 15, below every other process a test starts on these 2 cores
# (torch's import in an actor took 60 s beside a busy process): the tests' clusters run them at 0.
os.environ.setdefault("RAY_worker_niceness", "0")


def run_checked(cmd: list[str], timeout: float, env: dict[str, str] | None = None,
                cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    """Run `cmd`, fail the test with its output on a non-zero exit or after `timeout` seconds."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {}))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env,
                              cwd=cwd or REPO, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{' '.join(cmd)} timed out after {timeout}s\nstdout:\n{exc.stdout}\nstderr:\n{exc.stderr}")
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


class Job:
    """A launcher process (and everything it starts) with its output in a file."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self.argv, self.log = argv, log
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", RAY_DEDUP_LOGS="0")
        self._fh = open(log, "w")
        self.proc = subprocess.Popen(argv, stdout=self._fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, cwd=REPO, start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            pytest.fail(f"{' '.join(self.argv)} did not end within {timeout}s\n{self.output()[-6000:]}")

    def kill_all(self) -> list[int]:
        """SIGKILL the launcher and all its descendants at once (a crash of the whole job);
        returns the pids killed. Horovod's workers run in sessions of their own: they are found
        as descendants, not through the process group."""
        try:
            procs = [psutil.Process(self.proc.pid)]
            procs += procs[0].children(recursive=True)
        except psutil.NoSuchProcess:
            procs = []
        for p in procs:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        return [p.pid for p in procs]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill_all()
        self._fh.close()


@pytest.fixture
def jobs():
    started: list[Job] = []

    def start(argv: list[str], log: Path) -> Job:
        job = Job(argv, log)
        started.append(job)
        return job

    yield start
    for job in started:
        job.close()


def horovodrun(np: int, *args: str) -> list[str]:
    """A fixed-size horovodrun command line over Gloo on 127.0.0.1 (loopback interface)."""
    return [str(BIN / "horovodrun"), "-np", str(np), "-H", f"localhost:{np}", "--gloo",
            "--network-interface", "lo", *args]


def launch_ray(address: str, *args: str) -> list[str]:
    """An `hvd-abs launch ray` command line against the Ray cluster at `address`."""
    return [str(BIN / "hvd-abs"), "launch", "ray", "--address", address, *args]


@pytest.fixture
def fake_ray():
    """Start fake Ray clusters: `fake_ray(nodes)` -> FakeRayCluster; all torn down after the test."""
    clusters: list[FakeRayCluster] = []

    def start(nodes: int) -> FakeRayCluster:
        try:
            clusters.append(FakeRayCluster(nodes))
        except FakeClusterError as exc:
            pytest.fail(str(exc))
        return clusters[-1]

    yield start
    for c in clusters:
        c.close()


# Under pytest-xdist (`make test` runs 2 processes) each file stays on one process, so its module
# fixtures are built once; the two namespace-cluster files share one, as their hosts' addresses
# are fixed (scripts/local_cluster.sh). (A scheduler of our own: xdist 3.8's `xdist_group` marks
# rename node ids in a way pytest 9 no longer reads, so `--dist loadgroup` grouped nothing.)
SHARED_GROUPS = {"test_multihost": "namespace_hosts", "test_multihost_ray": "namespace_hosts"}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    from xdist.scheduler import LoadScopeScheduling

    class ByFile(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return SHARED_GROUPS.get(Path(path).stem, path)

    return ByFile(config, log)
