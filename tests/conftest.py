"""Shared helpers for tests that start real processes (horovodrun, Ray) from pytest."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv running pytest holds horovodrun and hvd-abs
WORKERS = Path(__file__).resolve().parent / "workers"
sys.path.insert(0, str(WORKERS))
from ray_fake_nodes import FakeClusterError, FakeRayCluster  # noqa: E402


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
