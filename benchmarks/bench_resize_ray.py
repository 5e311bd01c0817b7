"""Resize stall on Ray: in place (hvd_abs's Ray executor) against a restart, 1 -> 2 and 2 -> 1 workers.

Job: the toy elastic job of tests/workers/ray_toy_job.py (per step: one allreduce, `--step-s`
seconds of "compute", commit of a small state), on a `ray.cluster_utils.Cluster` of two 1-CPU
fake nodes on this machine (one worker per node).

stall = (time of the first step after the resize) - (time of the last step before it) - one
step time, where one step time is the median step interval of the same run at the smaller size.
Times are rank 0's clock at each committed step (rank 0 lives on the oldest node and survives).

- in place: one run; the job asks for 2 workers at step `--at` and for 1 at step 2 x `--at`
  (the world-size signal, as the trainer does when its batch grows); the executor grows and
  shrinks it: a new actor joins (1 -> 2) / the extra actor leaves (2 -> 1), rank 0's state is
  broadcast, nobody restarts.
- restart: the job runs at 1 worker to step `--at`, the executor is shut down, a new one starts
  at 2 workers and resumes from the state snapshot to step 2 x `--at`, then the same to 1 worker:
  every worker process is new at each resize (Ray's own elasticity works this way).
Each is repeated `--repeats` times; medians reported. Prints one JSON object and writes
benchmarks/results/resize_ray.json.

Usage: python benchmarks/bench_resize_ray.py [--repeats 3] [--at 20] [--step-s 0.05]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import ray.cloudpickle
from ray.cluster_utils import Cluster

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "workers"))
import ray_toy_job  # noqa: E402

from hvd_abs.elastic.ray_executor import RayElasticExecutor  # noqa: E402
from hvd_abs.elastic.world_signal import write_wanted  # noqa: E402

ray.cloudpickle.register_pickle_by_value(ray_toy_job)  # actors cannot import tests/workers
RESULTS = ROOT / "benchmarks" / "results" / "resize_ray.json"


def stall(times: list[float], sizes: list[int], before: int, after: int) -> float:
    """Stall of the first before -> after size change in one ledger."""
    i = next(k for k in range(1, len(sizes)) if sizes[k - 1] == before and sizes[k] == after)
    small = min(before, after)
    steps = [times[k] - times[k - 1] for k in range(1, len(sizes)) if sizes[k] == sizes[k - 1] == small]
    return times[i] - times[i - 1] - statistics.median(steps)


def rank0_ledger(results: list[dict[str, Any]]) -> dict[str, Any]:
    return next(r for r in results if r["rank"] == 0)["ledger"]


def in_place(at: int, step_s: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="bench_ray_") as run_dir:
        write_wanted(run_dir, 1)
        with RayElasticExecutor(min_workers=1, max_workers=2, run_dir=run_dir, elastic_timeout=120) as ex:
            results = ex.run(ray_toy_job.toy_job, (run_dir, 3 * at, step_s, {at: 2, 2 * at: 1}))
    led = rank0_ledger(results)
    return {"1->2": stall(led["times"], led["sizes"], 1, 2), "2->1": stall(led["times"], led["sizes"], 2, 1)}


def restart(at: int, step_s: float) -> dict[str, float]:
    snapshot: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="bench_ray_") as run_dir:
        for n, until in ((1, at), (2, 2 * at), (1, 3 * at)):
            # A fixed-size job: no run_dir signal, min = max = n.
            with RayElasticExecutor(min_workers=n, max_workers=n, elastic_timeout=120) as ex:
                snapshot = rank0_ledger(ex.run(ray_toy_job.toy_job, (run_dir, until, step_s, None, snapshot)))
    return {"1->2": stall(snapshot["times"], snapshot["sizes"], 1, 2),
            "2->1": stall(snapshot["times"], snapshot["sizes"], 2, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--at", type=int, default=20, help="steps between resizes")
    p.add_argument("--step-s", type=float, default=0.05, help="seconds of 'compute' per step")
    args = p.parse_args()
    if args.repeats < 1 or args.at < 3 or args.step_s <= 0:
        p.error("pass --repeats >= 1, --at >= 3 and --step-s > 0")

    runs: dict[str, list[dict[str, float]]] = {"in_place": [], "restart": []}
    # Ray prints worker deaths (the dropped worker of a shrink) to stdout: keep stdout for the JSON.
    with contextlib.redirect_stdout(sys.stderr):
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        try:
            cluster.add_node(num_cpus=1)
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, log_to_driver=False)
            _ = in_place(args.at, args.step_s)  # burn-in: the first actor starts pay for cold caches
            for _ in range(args.repeats):
                for mode, fn in (("in_place", in_place), ("restart", restart)):
                    t0 = time.time()
                    runs[mode].append(fn(args.at, args.step_s))
                    print(json.dumps({"mode": mode, **runs[mode][-1], "wall_s": round(time.time() - t0, 2)}),
                          file=sys.stderr, flush=True)
        finally:
            ray.shutdown()
            cluster.shutdown()

    summary = {mode: {k: {"median_s": round(statistics.median(r[k] for r in rs), 3),
                          "runs_s": [round(r[k], 3) for r in rs]} for k in ("1->2", "2->1")}
               for mode, rs in runs.items()}
    for k in ("1->2", "2->1"):
        summary.setdefault("speedup", {})[k] = round(summary["restart"][k]["median_s"]
                                                     / max(summary["in_place"][k]["median_s"], 1e-9), 2)
    out = {"benchmark": "resize_ray",
           "setup": {"cluster": "ray.cluster_utils.Cluster, 2 fake nodes x 1 CPU, one worker per node",
                     "job": "toy elastic job (allreduce + sleep + commit per step)", "step_s": args.step_s,
                     "steps_between_resizes": args.at, "repeats": args.repeats, "cpus": os.cpu_count(),
                     "python": platform.python_version(), "ray": ray.__version__,
                     "horovod": __import__("horovod").__version__, "torch": __import__("torch").__version__},
           "definition": "stall = first step after - last step before - one step time (rank 0 clock)",
           **summary}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
