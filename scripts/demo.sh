#!/usr/bin/env bash
# `make demo`: elastic ABSA on the offline digits data. horovodrun starts 1 worker; when the
# Hessian's top eigenvalue halves (or after --duration checks) the global batch doubles, the job
# asks for 2 workers, and the second joins in place. Prints the per-epoch table, the summary
# (updates, final accuracy, world-size timeline, resize stalls) and the plot's path.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${DEMO_OUT:-runs/demo}"
exec .venv/bin/hvd-abs launch horovod --min-np 1 --max-np 2 -- \
  --dataset digits --model cnn --method absa --epochs 10 --base-batch 32 --batch 32 --max-batch 256 \
  --duration 2 --lr 0.05 --quiet --out "$out" --overwrite "$@"
