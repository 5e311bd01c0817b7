#!/usr/bin/env bash
# Builds Horovod (the version requirements.txt pins) from its source distribution with PyTorch and
# Gloo, patched as hvd_abs needs, and installs it into the environment of the given Python:
#
#     bash scripts/build_horovod.sh /path/to/your/env/bin/python
#
# That environment needs torch already (and cmake and a C++ compiler; nvcc for a CUDA torch).
# The patches: 1. torch's headers need C++20 (Horovod's CMake files ask for 14). 2. A process
# set's Gloo device takes the interface of the global context (HOROVOD_GLOO_IFACE): 0.28.1 gives
# it an empty one, Gloo falls back to the hostname's address, 127.0.0.1 on hosts whose
# /etc/hosts maps their name to loopback (Debian's default), and a job across hosts dies at
# hvd.init() with "connect [127.0.0.1]: Connection refused".
# The wheel is cached in ${HVD_ABS_CACHE:-~/.cache/hvd_abs}/horovod/<key>, keyed by Horovod's and
# torch's versions, the patches and Python; delete it to force a build. scripts/setup_env.sh
# sources this file for the same steps.
HVD_CXX_STD=20
patch_desc="CMAKE_CXX_STANDARD 14->${HVD_CXX_STD} in CMakeLists.txt horovod/torch/CMakeLists.txt;
process-set gloo device iface from global_context in horovod/common/gloo/gloo_context.cc"

declare -F step >/dev/null || step() { printf '[build_horovod] %s\n' "$*"; }
declare -F die >/dev/null || die() { printf '[build_horovod] ERROR: %s\n' "$*" >&2; exit 1; }

# A CUDA build of torch makes Horovod's CMake (and hvd_abs's extension) look for the CUDA toolkit:
# point them at the toolkit of the nvcc on PATH (nvcc may be a wrapper, so ask nvcc where it lives).
cuda_home_for() { # $1: the environment's python
  [[ -n "${CUDA_HOME:-}" ]] && return 0
  local torch_cuda top
  torch_cuda="$("$1" -c 'import torch; print(torch.version.cuda or "")')"
  [[ -n "$torch_cuda" ]] || return 0
  if command -v nvcc >/dev/null; then
    top="$(nvcc --dryrun -x cu /dev/null -c -o /dev/null 2>&1 | sed -n -E 's/^#\$ TOP=(.*)$/\1/p' | head -n1)"
    export CUDA_HOME="$(cd "$top" && pwd)"
    export CUDAToolkit_ROOT="$CUDA_HOME"
    step "torch is a CUDA $torch_cuda build; CUDA_HOME=$CUDA_HOME"
  else
    step "torch is a CUDA $torch_cuda build but nvcc is not on PATH: building CPU-only"
  fi
}

build_horovod() { # $1: the environment's python, $2: Horovod's version
  local vpy="$1" hvd_v="$2" cache="${HVD_ABS_CACHE:-$HOME/.cache/hvd_abs}" torch_v py_tag hkey wheel_dir work src gctx
  torch_v="$("$vpy" -c 'import torch; print(torch.__version__.split("+")[0])')" \
    || die "$vpy has no torch: install torch into that environment first"
  cuda_home_for "$vpy"
  py_tag="$("$vpy" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
  hkey="$(printf '%s\n' "$hvd_v" "$torch_v" "$patch_desc" "$py_tag" | sha256sum | cut -c1-16)"
  wheel_dir="$cache/horovod/$hkey"
  if ls "$wheel_dir"/horovod-*.whl >/dev/null 2>&1; then
    step "using cached Horovod $hvd_v wheel ($wheel_dir)"
  else
    step "building Horovod $hvd_v from source with PyTorch + Gloo (about 4 minutes on 2 cores)"
    work="$(mktemp -d)"
    # The path is expanded now: $work is local and gone when an EXIT trap would run (set -u).
    trap "rm -rf '$work'" EXIT
    "$vpy" -m pip download --disable-pip-version-check -q --no-deps --no-binary :all: -d "$work" "horovod==$hvd_v" \
      2>&1 | grep -v -E "^WARNING: Location" || true
    tar -xzf "$work"/horovod-"$hvd_v".tar.gz -C "$work" || die "could not download horovod==$hvd_v's sdist"
    src="$work/horovod-$hvd_v"
    for f in "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"; do
      grep -q 'set(CMAKE_CXX_STANDARD 14)' "$f" || die "patch target not found in $f: Horovod's sources changed"
      sed -i "s/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD ${HVD_CXX_STD})/" "$f"
    done
    gctx="$src/horovod/common/gloo/gloo_context.cc"
    sed -i '/^void GlooContext::InitializeForProcessSet/,/CreateDevice/ s/^  device_attr.iface = gloo_iface_;$/  gloo_iface_ = global_context.gloo_iface_;\n  device_attr.iface = gloo_iface_;/' "$gctx"
    grep -q 'gloo_iface_ = global_context.gloo_iface_;' "$gctx" || die "patch target not found in $gctx: Horovod's sources changed"
    mkdir -p "$work/dist"
    # --no-build-isolation: the build must see the installed torch (horovod#3744).
    if ! HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 HOROVOD_WITHOUT_TENSORFLOW=1 \
        HOROVOD_WITHOUT_MXNET=1 MAKEFLAGS="-j$(nproc)" \
        "$vpy" -m pip wheel --disable-pip-version-check --no-build-isolation --no-deps -w "$work/dist" "$src" \
        > "$work/build.log" 2>&1; then
      tail -n 40 "$work/build.log" >&2
      die "Horovod build failed (log tail above): check CUDA_HOME, cmake and the C++ compiler"
    fi
    mkdir -p "$wheel_dir.tmp"
    cp "$work"/dist/horovod-*.whl "$wheel_dir.tmp/"
    rm -rf "$wheel_dir"; mv "$wheel_dir.tmp" "$wheel_dir"  # atomic: no half-written cache entry
    rm -rf "$work"; trap - EXIT
    step "Horovod wheel built and cached in $wheel_dir"
  fi
  # (its runtime needs: cloudpickle, psutil, pyyaml, packaging, cffi; --no-deps keeps this offline-safe)
  "$vpy" -m pip install --disable-pip-version-check -q --no-deps "$wheel_dir"/horovod-*.whl 2>&1 \
    | grep -v -E "^WARNING: Location .* is ignored" || true

  step "checking Horovod's build (horovodrun --check-build)"
  local check
  check="$("$(dirname "$vpy")/horovodrun" --check-build 2>&1)" || die "horovodrun --check-build failed: $check"
  echo "$check" | sed 's/^/    /'
  echo "$check" | grep -q -E '\[X\] PyTorch' || die "Horovod was built without PyTorch support"
  echo "$check" | grep -q -E '\[X\] Gloo' || die "Horovod was built without Gloo support"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  set -euo pipefail
  [[ $# -eq 1 ]] || die "usage: bash scripts/build_horovod.sh /path/to/env/bin/python"
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  hvd_v="$(sed -n -E 's/^horovod==([^ ]+)$/\1/p' "$root/requirements.txt" | head -n1)"
  "$1" -m pip install --disable-pip-version-check -q cloudpickle psutil pyyaml packaging cffi
  build_horovod "$1" "$hvd_v"
fi
