#!/usr/bin/env bash
# The GPU work of issues 3 and 8 for a lent device machine (../.library/device: ~15 min of device
# time per session, 10 min per command). Run from the repo root; results under $OUT (default
# /tmp/gpu_checks), at most 8 files:
#
#     bash scripts/gpu_checks.sh checks     # issues 3 and 8 (GPU throughput), ~7 min
#     bash scripts/gpu_checks.sh study      # issue 8: a piece of the full ResNet-20 study
#
# checks: 1. builds hvd_abs._C with the machine's torch and nvcc (CUDA kernels), in place;
#   2. tests/test_vecops.py: CUDA parity (native vs foreach vs loop, float32/float64) and
#      torch.library.opcheck on CUDA; tests/test_augment.py: --augment on a GPU (the CPU's
#      crops, and a short absa run); tests/test_precision.py: a bf16 run on the GPU; -rs shows
#      whether anything still skipped;
#   3. bench_hessian.py --device cuda: HVP / gradient, Lanczos vs power, the vector phase;
#   4. issue 8's GPU throughput, when .device/cifar10.tgz is carried: bench_throughput.py --local
#      --device cuda (Trainer.step vs a plain PyTorch loop, ResNet-20 and C1; no Horovod there).
# study: benchmarks/abs_study.py --protocol full (ResNet-20, seeds 0 and 1, 8 runs at once) for
#   STUDY_S seconds (default 360), every run stopped at an epoch end with a checkpoint. Needs
#   the data carried: `tar czf .device/cifar10.tgz -C ../shared/data cifar10` (about 20 MB;
#   .device/ is git-ignored, name it in the run's carry). Runs of an earlier piece continue from
#   .device/study_runs.tgz when present; this piece's come back as $OUT/study_runs.tgz (newest
#   checkpoint of each unfinished run only): copy it to .device/ for the next piece. The table is
#   study_runs/results/abs_study_cuda_full.json inside it (or --collect-only on the unpacked runs).
# Every step has its own time limit (within BUDGET_S in all) and a failing step does not stop the
# next: $OUT/summary.txt and the logs in $OUT/logs.tgz say what happened.
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

# Logs go into one tarball: at most 8 files come back from $OUT.
LOGS=/tmp/gpu_checks_logs
rm -rf "$LOGS" && mkdir -p "$LOGS"
trap 'tar czf "$OUT/logs.tgz" -C "$LOGS" . 2>/dev/null' EXIT
# The device call may run 600 s at most: every step gets what is left of BUDGET_S (default 540).
BUDGET_S=${BUDGET_S:-540}
limit() { local left=$((BUDGET_S - SECONDS)); [ "$left" -gt "$1" ] && echo "$1" || echo $((left > 5 ? left : 5)); }

$PY -c "import pytest" 2>/dev/null || $PY -m pip install -q pytest >"$LOGS/pip.log" 2>&1

{ c++ --version | head -1; nvcc --version | tail -2; $PY -c 'import torch; print(torch.__config__.show())'; } \
    >"$LOGS/toolchain.log" 2>&1
say "toolchain: $(c++ --version 2>&1 | head -1); $(nvcc --version 2>&1 | grep -o 'release [0-9.]*')"
rm -f hvd_abs/_C*.so  # a failed build must not leave an older library to be tested
timeout "$(limit 300)" $PY setup.py build_ext --inplace >"$LOGS/build.log" 2>&1
say "build rc=$? ($(ls hvd_abs/_C*.so 2>/dev/null | head -1))"
grep "hvd_abs: WARNING" "$LOGS/build.log" | tee -a "$OUT/summary.txt"
say "backend $($PY -c 'from hvd_abs.second_order import vecops; print(vecops.backend_info())' 2>&1 | tail -1)"

# The test that once segfaulted on such a machine runs alone first, so a crash there neither hides
# the parity tests nor goes without a stack (faulthandler prints the Python one).
timeout "$(limit 60)" $PY -X faulthandler -m pytest -q -rs tests/test_vecops.py -k rejects \
    >"$LOGS/test_vecops_rejects.log" 2>&1
say "test_vecops -k rejects rc=$? $(tail -1 "$LOGS/test_vecops_rejects.log")"
timeout "$(limit 180)" $PY -X faulthandler -m pytest -q -rs tests/test_vecops.py tests/test_augment.py tests/test_precision.py -k "not rejects" \
    >"$LOGS/test_vecops.log" 2>&1
say "test_vecops rc=$? $(tail -1 "$LOGS/test_vecops.log")"

timeout "$(limit 200)" $PY benchmarks/bench_hessian.py --device cuda --skip distributed \
    --out "$OUT/hessian_cuda.json" >/dev/null 2>"$LOGS/bench_hessian.log"
say "bench_hessian rc=$?"
$PY - "$OUT/hessian_cuda.json" <<'EOF2' 2>&1 | tee -a "$OUT/summary.txt"
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
EOF2

if [ -f .device/cifar10.tgz ]; then
    mkdir -p /tmp/gpu_data && tar xzf .device/cifar10.tgz -C /tmp/gpu_data
    for model in resnet20 c1; do
        if [ $((BUDGET_S - SECONDS)) -lt 60 ]; then say "throughput $model skipped: out of time"; continue; fi
        timeout "$(limit 150)" $PY benchmarks/bench_throughput.py --local --device cuda --model "$model" \
            --pairs 60 --data-dir /tmp/gpu_data/cifar10 --out "$OUT/throughput_cuda_$model.json" \
            >"$LOGS/throughput_$model.log" 2>&1
        say "throughput $model rc=$? ratio_vs_plain_pytorch $($PY -c "import json, sys; print(json.load(open(sys.argv[1]))['ratio_vs_plain_pytorch'])" "$OUT/throughput_cuda_$model.json" 2>&1 | tail -1)"
    done
else
    say "no .device/cifar10.tgz: GPU throughput not measured"
fi
