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
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST="1.0", MAX_JOBS="2", HVD_ABS_CUDA="1")  # (asked: no GPU here)
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


def test_without_a_gpu_the_cuda_kernels_are_built_only_when_asked() -> None:
    """Most of a build's time is the CUDA kernels: without a GPU to run them they wait for
    HVD_ABS_CUDA=1. (`setup.py --name` decides what to build and compiles nothing.)"""
    if torch.version.cuda is None or shutil.which("nvcc") is None or torch.cuda.is_available():
        pytest.skip("needs a CUDA build of torch, nvcc on PATH and no GPU")
    plain = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 0 and "no GPU visible: building the CPU kernels only" in plain.stderr, plain.stderr
    asked = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True,
                           timeout=120, env=dict(os.environ, HVD_ABS_CUDA="1"))
    assert asked.returncode == 0 and "no GPU visible" not in asked.stderr, asked.stderr


def test_without_the_extension_a_run_says_how_to_build_it() -> None:
    probe = ("import sys; sys.modules['hvd_abs._C'] = None\n"  # (as if it were not built)
             "from hvd_abs.second_order import vecops; print(type(vecops.get()).__name__)")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ForeachOps", run.stderr
    assert "hvd_abs._C is not built" in run.stderr and "pip install --no-build-isolation ." in run.stderr


def test_the_package_declares_its_dependencies_and_extras(tmp_path: Path) -> None:
    """What `pip install .` reads (the wheel's METADATA, built without compiling anything)."""
    probe = ("import sys; from setuptools import build_meta as b; "
             f"print(b.prepare_metadata_for_build_wheel({str(tmp_path)!r}))")
    made = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-2000:]
    meta = (tmp_path / made.stdout.strip().splitlines()[-1] / "METADATA").read_text()
    import hvd_abs

    assert f"Version: {hvd_abs.__version__}" in meta
    requires = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    assert {"torch>=2.9", "click>=8.1", "timm>=1.0"} <= set(requires)
    assert 'horovod==0.28.1; extra == "horovod"' in requires and 'ray[default]>=2.60; extra == "ray"' in requires
    assert {"horovod", "ray", "tensorboard"} <= {line.split(":", 1)[1].strip() for line in meta.splitlines()
                                                 if line.startswith("Provides-Extra:")}
