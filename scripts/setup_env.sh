#!/usr/bin/env bash
# Builds the project's virtualenv in .venv: torch, Ray, Horovod (built from source with a patched
# C++ standard) and the project itself with its C++ extension. Idempotent: a stamp keyed on every
# input (pins, patch, this script, setup.py and cpp/) makes a second run a no-op, and any change
# of input rebuilds. The Horovod wheel is cached outside the repo (HVD_ABS_CACHE, default
# ~/.cache/hvd_abs) keyed by (Horovod version, torch version, patch, Python); delete it to force a
# from-source build.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$root/.venv"
py="${PYTHON:-python3.11}"
cache="${HVD_ABS_CACHE:-$HOME/.cache/hvd_abs}"
req="$root/requirements.txt"
t0=$(date +%s)

step() { printf '[setup_env %4ss] %s\n' "$(($(date +%s) - t0))" "$*"; }
die() { printf '[setup_env] ERROR: %s\n' "$*" >&2; exit 1; }

pin() { # version pinned for package $1 in requirements.txt
  sed -n -E "s/^$1(\[[a-z]+\])?==([^ ]+)$/\2/p" "$req" | head -n1
}

# The patches applied to Horovod's sdist; their text is part of the cache key and the stamp.
# 1. torch's headers need C++20.
# 2. A process set's Gloo device takes the interface of the global context (HOROVOD_GLOO_IFACE):
#    0.28.1 gives it an empty one, so Gloo falls back to the hostname's address, 127.0.0.1 on
#    hosts whose /etc/hosts maps their name to loopback (Debian's default), and a job across
#    hosts dies at hvd.init() with "connect [127.0.0.1]: Connection refused".
HVD_CXX_STD=20
patch_desc="CMAKE_CXX_STANDARD 14->${HVD_CXX_STD} in CMakeLists.txt horovod/torch/CMakeLists.txt;
process-set gloo device iface from global_context in horovod/common/gloo/gloo_context.cc"

# Two stamps: .venv/.stamp covers the environment's inputs, the pins, Horovod's patch and the
# Python (a change rebuilds .venv from nothing); .venv/.ext-stamp covers the project's build
# inputs (a change only reruns `pip install -e .`).
stamp_key() {
  { grep -v -E '^(#|$)' "$req"; echo "$patch_desc"; "$py" --version; } | sha256sum | cut -c1-16
}
ext_key() {
  { cat "$root/setup.py"; find "$root/cpp" -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' \) -print0 \
      | sort -z | xargs -0 cat; } | sha256sum | cut -c1-16
}
install_project() {
  step "installing hvd_abs (pip install -e .) and building its C++ extension"
  # One SASS target plus PTX (which newer GPUs JIT-compile) keeps the nvcc step short on 2 cores.
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0+PTX}"
  cuda_home_from_nvcc
  # --use-pep517 --no-build-isolation: setuptools' legacy `develop` re-runs the build in an
  # isolated environment without torch, which silently skips the extension.
  if ! MAX_JOBS="$(nproc)" "$venv/bin/python" -m pip install --disable-pip-version-check --no-build-isolation \
      --use-pep517 --no-deps -e "$root" > "$venv/install.log" 2>&1; then
    tail -n 40 "$venv/install.log" >&2
    die "pip install -e . failed (log tail above, full log in .venv/install.log)"
  fi
  grep -E "hvd_abs: WARNING" "$venv/install.log" >&2 || true
  "$venv/bin/python" -c 'from hvd_abs.second_order import vecops; i = vecops.backend_info(); print(
      "    extension backend:", i["backend"], "(CUDA kernels)" if i["native_cuda"] else "", i["reason"] or "")'
  "$venv/bin/hvd-abs" --version
  ext_key > "$venv/.ext-stamp"
}
# A CUDA build of torch makes Horovod's CMake (and our extension) look for the CUDA toolkit: point
# them at the toolkit of the nvcc on PATH (nvcc may be a wrapper script, so ask nvcc where it lives).
cuda_home_from_nvcc() {
  [[ -n "${CUDA_HOME:-}" ]] && return 0
  local torch_cuda top
  torch_cuda="$("$venv/bin/python" -c 'import torch; print(torch.version.cuda or "")')"
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

command -v "$py" >/dev/null || die "$py not found: install Python 3.11 or set PYTHON=/path/to/python3.11"
key="$(stamp_key)"
if [[ -f "$venv/.stamp" && "$(cat "$venv/.stamp")" == "$key" ]]; then
  if [[ -f "$venv/.ext-stamp" && "$(cat "$venv/.ext-stamp")" == "$(ext_key)" ]]; then
    step "environment up to date (.venv, stamp $key)"
  else
    install_project
  fi
  exit 0
fi

step "creating virtualenv in .venv with $("$py" --version)"
rm -rf "$venv"
"$py" -m venv "$venv"
vpy="$venv/bin/python"
pipi() { "$vpy" -m pip install --disable-pip-version-check -q "$@" 2>&1 | grep -v -E "^WARNING: Location .* is ignored" || true; }

torch_v="$(pin torch)"; tv_v="$(pin torchvision)"; hvd_v="$(pin horovod)"
[[ -n "$torch_v" && -n "$hvd_v" ]] || die "requirements.txt must pin torch and horovod"

step "installing torch $torch_v + torchvision $tv_v (about 1 minute)"
pipi "torch==$torch_v" "torchvision==$tv_v"
"$vpy" -c "import torch" || die "torch $torch_v did not install; check pip's output above"

step "installing the other pinned packages (Ray, numpy, click, pytest, ...)"
grep -v -E '^(#|$|torch==|torchvision==|horovod==)' "$req" > "$venv/other-requirements.txt"
pipi -r "$venv/other-requirements.txt"
"$vpy" -c "import ray, click, numpy, sklearn, matplotlib, tqdm" || die "a pinned package failed to install"

cuda_home_from_nvcc

py_tag="$("$vpy" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
hkey="$(printf '%s\n' "$hvd_v" "$torch_v" "$patch_desc" "$py_tag" | sha256sum | cut -c1-16)"
wheel_dir="$cache/horovod/$hkey"
if ls "$wheel_dir"/horovod-*.whl >/dev/null 2>&1; then
  step "using cached Horovod $hvd_v wheel ($wheel_dir)"
else
  step "building Horovod $hvd_v from source with PyTorch + Gloo (about 4 minutes on 2 cores)"
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
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
  step "Horovod wheel built and cached in $wheel_dir"
fi
pipi --no-deps "$wheel_dir"/horovod-*.whl

step "checking Horovod's build (horovodrun --check-build)"
check="$("$venv/bin/horovodrun" --check-build 2>&1)" || die "horovodrun --check-build failed: $check"
echo "$check" | sed 's/^/    /'
echo "$check" | grep -q -E '\[X\] PyTorch' || die "Horovod was built without PyTorch support"
echo "$check" | grep -q -E '\[X\] Gloo' || die "Horovod was built without Gloo support"

install_project
echo "$key" > "$venv/.stamp"
step "environment ready in $(($(date +%s) - t0)) s"
