"""Shared helpers for tests that start real processes (horovodrun, Ray) from pytest."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv running pytest holds horovodrun and hvd-abs
WORKERS = Path(__file__).resolve().parent / "workers"


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


def horovodrun(np: int, *args: str) -> list[str]:
    """A fixed-size horovodrun command line over Gloo on 127.0.0.1 (loopback interface)."""
    return [str(BIN / "horovodrun"), "-np", str(np), "-H", f"localhost:{np}", "--gloo",
            "--network-interface", "lo", *args]


def launch_ray(address: str, *args: str) -> list[str]:
    """An `hvd-abs launch ray` command line against the Ray cluster at `address`."""
    return [str(BIN / "hvd-abs"), "launch", "ray", "--address", address, *args]


class FakeRayCluster:
    """A `ray.cluster_utils.Cluster` of 1-CPU fake nodes held by tests/workers/ray_fake_nodes.py in
    a child process of its own session (a hang or a crash never leaves a cluster behind)."""

    def __init__(self, nodes: int) -> None:
        self.proc = subprocess.Popen([sys.executable, str(WORKERS / "ray_fake_nodes.py"), "--nodes", str(nodes)],
                                     cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, start_new_session=True)
        self.address = self._answer("ADDRESS", timeout=120)

    def _answer(self, tag: str, timeout: float = 60) -> str:
        # A reader thread bounds the wait: readline() itself cannot time out.
        box: list[str] = []
        reader = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        line = box[0] if box else ""
        if not line.startswith(tag + " "):
            pytest.fail(f"the fake Ray cluster answered {line!r} (wanted {tag} within {timeout}s)")
        return line[len(tag) + 1:].strip()

    def command(self, cmd: str, tag: str) -> str:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._answer(tag)

    def add_node(self) -> str:
        return self.command("add", "ADDED")

    def remove_node(self) -> str:
        return self.command("remove", "REMOVED")

    def autoscaler_request(self) -> list:
        """The standing `request_resources` request as the GCS holds it: [[bundle, count], ...]."""
        return json.loads(self.command("request", "REQUEST"))

    def close(self) -> None:
        try:
            self.proc.stdin.close()  # the holder shuts the cluster down
            self.proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)


@pytest.fixture
def fake_ray():
    """Start fake Ray clusters: `fake_ray(nodes)` -> FakeRayCluster; all torn down after the test."""
    clusters: list[FakeRayCluster] = []

    def start(nodes: int) -> FakeRayCluster:
        clusters.append(FakeRayCluster(nodes))
        return clusters[-1]

    yield start
    for c in clusters:
        c.close()
