#!/usr/bin/env bash
# The GPU checks of issue 3, as one command for a lent device machine (../.library/device: one
# call, ~15 min of device time per session, 10 min per command). Run from the repo root:
#
#     bash scripts/gpu_checks.sh            # writes under $OUT (default /tmp/gpu_checks)
#
# 1. builds hvd_abs._C with the machine's torch and nvcc (CUDA kernels), in place;
# 2. tests/test_vecops.py: CUDA parity (native vs foreach vs loop, float32/float64) and
#    torch.library.opcheck on CUDA; -rs shows whether anything still skipped;
# 3. bench_hessian.py --device cuda: HVP / gradient, Lanczos vs power, the vector phase.
# Every step has its own time limit and a failing step does not stop the next: the logs and
# JSON under $OUT say what happened. Nothing here needs Horovod or the data set.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_checks}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
say() { echo "[gpu_checks $(date +%T)] $*" | tee -a "$OUT/summary.txt"; }

say "$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>&1 | head -1)"
say "python $($PY -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1)"
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
