"""setup.py's promise: a broken CUDA toolchain never costs the CPU kernels (nor the install)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.multiprocess
def test_a_failed_cuda_build_falls_back_to_a_working_cpu_extension(tmp_path: Path) -> None:
    if torch.version.cuda is None or shutil.which("nvcc") is None:
        pytest.skip("needs a CUDA build of torch and nvcc on PATH: otherwise no CUDA build is tried")
    # An arch nvcc rejects makes the CUDA build fail at once. The retry used to keep the CUDA
    # libraries (no link without them) and drop the module's name (a library Python cannot import).
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST="1.0", MAX_JOBS="2")
    build = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-lib", str(tmp_path / "lib"),
                            "--build-temp", str(tmp_path / "tmp")], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=900)
    assert build.returncode == 0, build.stderr[-3000:]
    assert "retrying the extension without CUDA kernels" in build.stderr, build.stderr[-3000:]
    assert "no C++ extension" not in build.stderr
    (lib,) = (tmp_path / "lib" / "hvd_abs").glob("_C*.so")
    probe = f"""
import importlib.util, torch
spec = importlib.util.spec_from_file_location("hvd_abs._C", {str(lib)!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
a = [torch.arange(5.0)]
print(module.with_cuda, float(torch.ops.hvd_abs.list_dot(a, a)))
"""
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert loaded.stdout.split() == ["False", "30.0"]
