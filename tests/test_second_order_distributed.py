"""Two real Horovod processes (Gloo on localhost) give the one-process result on the union of
their shards. Kept to one launch: the worker checks products, eigenvalues and the trace."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).parent / "workers" / "hessian_dist_worker.py"


def _horovodrun() -> str:
    exe = Path(sys.executable).parent / "horovodrun"
    found = str(exe) if exe.exists() else shutil.which("horovodrun")
    if not found:
        pytest.fail("horovodrun not found: run scripts/setup_env.sh (it builds Horovod with Gloo)")
    return found


@pytest.mark.multiprocess
def test_two_workers_equal_one_process_on_the_union(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1]))
    cmd = [_horovodrun(), "-np", "2", "-H", "localhost:2", "--gloo", "--network-interface", "lo",
           sys.executable, str(WORKER), "check", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, f"horovodrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    res = json.loads(out.read_text())
    assert res["size"] == 2 and res["comm"].startswith("HorovodComm(")  # auto-detected, sharded
    dist, single = res["dist"], res["single"]
    assert dist["hvp"] == pytest.approx(single["hvp"], rel=1e-10, abs=1e-12)
    assert dist["eig"] == pytest.approx(single["eig"], rel=1e-8)
    assert dist["eig_hvps"] == single["eig_hvps"]
    assert dist["trace"] == pytest.approx(single["trace"], rel=1e-10)
    for key in ("nodes", "weights"):  # the spectral density's quadrature, probe by probe
        for a, b in zip(dist["density"][key], single["density"][key]):
            assert a == pytest.approx(b, rel=1e-8, abs=1e-10)
    assert res["resnet20_hvp_rel_err"] < 1e-5  # float32 ResNet-20, strided conv gradients
