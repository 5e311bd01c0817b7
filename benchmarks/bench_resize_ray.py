"""Resize stalls on Ray: 1 -> 2 and 2 -> 1 workers, in place vs a restart baseline on Ray.

The horovodrun benchmark's job and format (benchmarks/bench_resize.py: ResNet-20 on a fixed
CIFAR-10 subset, sgd at a global batch of 2 x --base-batch, so the job wants 2 workers), run by
`hvd-abs launch ray` on a `ray.cluster_utils.Cluster` of 1-CPU fake nodes on this machine (one
worker per node; tests/workers/ray_fake_nodes.py holds the cluster).

- in place: `hvd-abs launch ray --max-workers 2 [--cold]` on a one-node cluster: the job runs on 1 worker
  (accumulating 2 x base); after --k updates a node is added and a worker joins in place (the
  job's `resize` event); after --k more updates on 2 workers the node is removed: its worker dies
  and the survivor rolls back to the last commit (every update here) and goes on (the `failure`
  event). Stalls are those events' `stall_s`: from the end of the last update before the reset to
  the end of the first after it, minus one update's time. Ray has no graceful leave: a node going
  away is how a Ray job loses a worker. Warm (the default): the joiner's slot is offered once it
  has imported and loaded the data; cold (`--cold`): at once, the running worker waits for it.
- restart: what Ray users do without elastic training, on a two-node cluster: a fixed-size job
  (`--min-workers n --max-workers n`) stops at update --k with a checkpoint, a new fixed-size job
  at the new size resumes it: every worker process is new. The stall is measured as in
  bench_resize.py (shared code).

Prints one JSON object and writes benchmarks/results/resize_ray.json: stall seconds per resize
each way and their ratios (in place / restart).
Usage: python benchmarks/bench_resize_ray.py [--k 6] [--train-subset 4096]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests" / "workers"))
from _args import check_out  # noqa: E402
from bench_resize import BIN, check_job_options, drive_in_place, job_options, measured, restart, stalls, update_times  # noqa: E402
from ray_fake_nodes import FakeRayCluster  # noqa: E402

from hvd_abs.atomic import write_text_atomic  # noqa: E402

# The fake cluster and its drivers on loopback (Ray's node IP 127.0.0.1), as in the tests.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def launcher(address: str):
    def launch(n: int) -> list[str]:
        return [str(BIN / "hvd-abs"), "launch", "ray", "--address", address, "--min-workers", str(n),
                "--max-workers", str(n)]
    return launch


def in_place(args: argparse.Namespace, work: Path, warm: bool) -> dict:
    out = work / ("in_place_warm" if warm else "in_place_cold")
    with FakeRayCluster(1) as cluster:
        cmd = [str(BIN / "hvd-abs"), "launch", "ray", "--address", cluster.address, "--max-workers", "2",
               "--warm" if warm else "--cold"]
        drive_in_place(cmd, args, out,
                       grow=cluster.add_node,  # a node joins: 1 -> 2 in place
                       shrink=cluster.remove_node)  # it goes away: 2 -> 1 (the survivor rolls back one update)
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"event"' in line]
    join = [e for e in events if e["event"] == "resize" and e["world_size"] == 2]
    leave = [e for e in events if e["event"] == "failure" and e["world_size"] == 1]
    return {"join_stall_s": join[0]["stall_s"] if join else None, "leave_stall_s": leave[0]["stall_s"] if leave else None,
            "resizes": len(join) + len(leave), **update_times(out)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    job_options(p, "resize_ray.json")
    args = p.parse_args()
    check_job_options(p, args)
    check_out(p, Path(args.out))
    from hvd_abs.data import load_dataset

    # A data dir without CIFAR-10: one line now, not tracebacks from every Ray worker; also builds
    # the decode cache once, before the workers.
    load_dataset("cifar10", data_dir=args.data_dir)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="hvd_abs_resize_ray_") as tmp:
        work = Path(tmp)
        # Each checked as soon as it is measured: a missing one stops the benchmark there.
        cold = measured("in place, cold", in_place(args, work, warm=False))
        warm = measured("in place, warm", in_place(args, work, warm=True))
        with FakeRayCluster(2) as cluster:
            launch = launcher(cluster.address)
            up = measured("restart 1 -> 2", restart(args, work, 1, 2, launch))
            down = measured("restart 2 -> 1", restart(args, work, 2, 1, launch))
    result = {
        "machine": f"{os.cpu_count()} CPU cores, CPU only", "launcher": "hvd-abs launch ray",
        "cluster": "ray.cluster_utils.Cluster, 1-CPU fake nodes on this machine, one worker per node",
        "model": "resnet20", "data": "cifar10 JPEG subset", "train_subset": args.train_subset,
        "global_batch": 2 * args.base_batch, "updates_before_resize": args.k,
        **stalls(cold, warm, up, down),
        "leave_is": "a node removed (worker lost, rollback to the last commit)",
        "bench_s": time.time() - t0,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")  # a crash leaves the previous file whole
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    from hvd_abs.errors import user_errors_exit_2

    sys.exit(user_errors_exit_2(main)())  # bad input (a data dir, a flag): one line, exit 2
