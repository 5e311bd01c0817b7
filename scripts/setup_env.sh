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

# Horovod's build, its patches (their text is part of the cache key and the stamp) and CUDA_HOME.
source "$root/scripts/build_horovod.sh"

# Two stamps: .venv/.stamp covers the environment's inputs, the pins, Horovod's patch and the
# Python (a change rebuilds .venv from nothing); .venv/.ext-stamp covers the project's build
# inputs (a change only reruns `pip install -e .`).
stamp_key() {
  { grep -v -E '^(#|$)' "$req"; echo "$patch_desc"; "$py" --version; } | sha256sum | cut -c1-16
}
ext_key() {
  { cat "$root/setup.py" "$root/pyproject.toml"; find "$root/cpp" -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' \) -print0 \
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
cuda_home_from_nvcc() { cuda_home_for "$venv/bin/python"; }

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

build_horovod "$vpy" "$hvd_v"

install_project
echo "$key" > "$venv/.stamp"
step "environment ready in $(($(date +%s) - t0)) s"
