"""What the gns growth trigger costs: updates with its gradient-norm measurement vs without.

One process, ResNet-20 (or --model) on CIFAR-10, sgd-free: two `abs` Trainers with the same
layout (--base-batch 64, --batch 128: two micro-batches an update), one with
`--growth-trigger gns` (it measures micro-batch 0's and the global batch's gradient norms every
update), one with `--growth-trigger schedule` (it measures nothing). Single updates alternate in
ABBA order (a noisy machine loads both alike); the overhead is the ratio of the medians minus 1,
and the share of an epoch is that overhead, as the measurement is per update (the epoch-end
check itself is a few float operations). Target: at most 1% of an epoch (issue 21).

Writes benchmarks/results/gns_cost.json (or --out) and prints it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from _args import add_data_dir, check_out  # noqa: E402 (benchmarks/, beside this file)
from hvd_abs.atomic import write_text_atomic  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20", choices=("c1", "resnet20", "cnn"))
    p.add_argument("--pairs", type=int, default=40, help="timed (gns, duration) update pairs, alternating")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    add_data_dir(p)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gns_cost.json"))
    args = p.parse_args(argv)
    if args.pairs < 1:
        p.error(f"--pairs must be >= 1, got {args.pairs}")
    if args.warmup < 0 or args.threads < 0:
        p.error(f"--warmup and --threads must be >= 0, got {args.warmup} and {args.threads}")
    check_out(p, Path(args.out))
    import torch

    from hvd_abs.data import load_dataset
    from hvd_abs.training import TrainConfig, Trainer

    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_dataset("cifar10", data_dir=args.data_dir)
    with tempfile.TemporaryDirectory(prefix="bench_gns_") as tmp:
        def trainer(trigger: str) -> Trainer:
            cfg = TrainConfig(method="abs", dataset="cifar10", data_dir=args.data_dir, model=args.model, epochs=90,
                              base_batch=64, batch=128, max_batch=16384, growth_trigger=trigger, lr=0.02, seed=0,
                              out=str(Path(tmp) / trigger), overwrite=True, quiet=True)
            return Trainer(cfg, data=data)

        runs = {"gns": trainer("gns"), "duration": trainer("schedule")}
        assert runs["gns"].controller.needs_noise_scale and not runs["duration"].controller.needs_noise_scale

        def timed(name: str) -> float:
            t0 = time.perf_counter()
            if not runs[name].step():
                runs[name].sampler.new_epoch()
                runs[name].step()
            return time.perf_counter() - t0

        for name in runs:
            for _ in range(args.warmup):
                timed(name)
        times: dict[str, list[float]] = {name: [] for name in runs}
        for i in range(args.pairs):
            for name in (("gns", "duration") if i % 2 == 0 else ("duration", "gns")):
                times[name].append(timed(name))
        measured = runs["gns"]._epoch_sums.tolist()[4]
    med = {name: statistics.median(t) for name, t in times.items()}
    overhead = med["gns"] / med["duration"] - 1
    result = {"model": args.model, "global_batch": 128, "base_batch": 64, "pairs": args.pairs,
              "threads": torch.get_num_threads(), "update_s_gns": med["gns"], "update_s_without": med["duration"],
              "overhead_per_update": overhead, "share_of_epoch": max(overhead, 0.0), "target_share": 0.01,
              "measured_updates": int(measured), "cpus": os.cpu_count(),
              "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:]))}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    from hvd_abs.errors import user_errors_exit_2

    sys.exit(user_errors_exit_2(main)())
