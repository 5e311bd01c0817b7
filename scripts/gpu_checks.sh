#!/usr/bin/env bash
# The GPU work of issues 3 and 8 for a lent device machine (../.library/device: ~15 min of device
# time per session, 10 min per command). Run from the repo root; results under $OUT (default
# /tmp/gpu_checks), at most 8 files:
#
#     bash scripts/gpu_checks.sh checks     # issue 3, ~5 min
#     bash scripts/gpu_checks.sh study      # issue 8: a piece of the full ResNet-20 study
#
# checks: 1. builds hvd_abs._C with the machine's torch and nvcc (CUDA kernels), in place;
#   2. tests/test_vecops.py: CUDA parity (native vs foreach vs loop, float32/float64) and
#      torch.library.opcheck on CUDA; -rs shows whether anything still skipped;
#   3. bench_hessian.py --device cuda: HVP / gradient, Lanczos vs power, the vector phase.
# study: benchmarks/abs_study.py --protocol full (ResNet-20, seeds 0 and 1, 8 runs at once) for
#   STUDY_S seconds (default 360), every run stopped at an epoch end with a checkpoint. Needs
#   the data carried: `tar czf .device/cifar10.tgz -C ../shared/data cifar10` (about 20 MB;
#   .device/ is git-ignored, name it in the run's carry). Runs of an earlier piece continue from
#   .device/study_runs.tgz when present; this piece's come back as $OUT/study_runs.tgz (newest
#   checkpoint of each unfinished run only): copy it to .device/ for the next piece. The table is
#   study_runs/results/abs_study_cuda_full.json inside it (or --collect-only on the unpacked runs).
# Every step has its own time limit and a failing step does not stop the next: the logs under
# $OUT say what happened.
set -uo pipefail
MODE=${1:-checks}
OUT=${OUT:-/tmp/gpu_checks}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
say() { echo "[gpu_checks $(date +%T)] $*" | tee -a "$OUT/summary.txt"; }
case "$MODE" in checks|study) ;; *) echo "usage: bash scripts/gpu_checks.sh checks|study" >&2; exit 2 ;; esac

say "$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>&1 | head -1)"
say "python $($PY -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1)"

if [ "$MODE" = study ]; then
    STUDY_S=${STUDY_S:-360}
    DEVICE=${STUDY_DEVICE:-cuda}
    if [ ! -f .device/cifar10.tgz ]; then
        say "no .device/cifar10.tgz: carry the data (see the header)"; exit 2
    fi
    work=/tmp/study_work
    rm -rf "$work" && mkdir -p "$work/data" "$work/study_runs"
    tar xzf .device/cifar10.tgz -C "$work/data"
    [ -f .device/study_runs.tgz ] && tar xzf .device/study_runs.tgz -C "$work" && say "continuing $(ls -d "$work"/study_runs/runs/*/ | wc -l) runs"
    # ${STUDY_ARGS}: the protocol (a dry run elsewhere may pass a smaller one).
    timeout $((STUDY_S + 300)) $PY benchmarks/abs_study.py ${STUDY_ARGS:---protocol full --models resnet20 --seeds 0,1 --jobs 8 --threads 2} \
        --device "$DEVICE" --data-dir "$work/data/cifar10" --runs-dir "$work/study_runs/runs" \
        --out "$work/study_runs/results" --name abs_study_cuda_full --stop-after-s "$STUDY_S" >"$OUT/study.log" 2>&1
    say "study rc=$? $(grep -c '^done ' "$OUT/study.log") runs finished in this piece"
    # Everything but older checkpoints (each unfinished run continues from its newest).
    (cd "$work" && { find study_runs -type f ! -path '*/checkpoints/*'
                     for d in study_runs/runs/*/checkpoints; do
                         [ -d "$d" ] && ls -1 "$d"/ckpt-*.pt 2>/dev/null | sort -V | tail -1
                     done; } | tar czf "$OUT/study_runs.tgz" -T -)
    say "study_runs.tgz $(du -h "$OUT/study_runs.tgz" | cut -f1)"
    exit 0
fi

# pytest is the one test dependency the machine may lack.
$PY -c "import pytest" 2>/dev/null || $PY -m pip install -q pytest >"$OUT/pip.log" 2>&1

timeout 300 $PY setup.py build_ext --inplace >"$OUT/build.log" 2>&1
say "build rc=$? ($(ls hvd_abs/_C*.so 2>/dev/null | head -1))"
say "backend $($PY -c 'from hvd_abs.second_order import vecops; print(vecops.backend_info())' 2>&1 | tail -1)"

timeout 180 $PY -m pytest -q -rs tests/test_vecops.py >"$OUT/test_vecops.log" 2>&1
say "test_vecops rc=$? $(tail -1 "$OUT/test_vecops.log")"

timeout 240 $PY benchmarks/bench_hessian.py --device cuda --skip distributed \
    --out "$OUT/hessian_cuda.json" >/dev/null 2>"$OUT/bench_hessian.log"
say "bench_hessian rc=$?"
$PY - "$OUT/hessian_cuda.json" <<'EOF' 2>&1 | tee -a "$OUT/summary.txt"
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except (OSError, ValueError) as exc:
    sys.exit(f"no benchmark JSON: {exc}")
h, e = d.get("hvp", {}), d.get("eigen", {})
print("hvp ratio_to_grad", h.get("ratio_to_grad"), "grad_s", h.get("grad_s"))
print("lanczos_over_power_time", e.get("lanczos_over_power_time"), "target_met", e.get("target_met"))
for dt, v in d.get("vector_phase", {}).items():
    print("vector_phase", dt, "native_vs_loop", v.get("native_vs_loop"), "native_vs_foreach", v.get("native_vs_foreach"))
EOF
