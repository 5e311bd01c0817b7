#!/usr/bin/env bash
# `make demo`: the longest real job that exists. Now: ABSA on the offline digits data, one process,
# a few epochs, with the batch doubling as the Hessian's top eigenvalue falls. Prints a summary
# table and the plot's path.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${DEMO_OUT:-runs/demo}"
exec .venv/bin/hvd-abs train --dataset digits --model cnn --method absa --epochs 12 \
  --base-batch 16 --batch 16 --max-batch 256 --lr 0.05 --out "$out" --overwrite "$@"
