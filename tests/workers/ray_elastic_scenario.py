"""Run the toy elastic job on a fake two-node Ray cluster and print one JSON report.

Scenario `crash` (`ray.cluster_utils.Cluster`, two 1-CPU fake nodes, one worker per node, wanted
2): rank 1's process exits at step 10 (a dead actor, node alive): rank 0 rolls back and goes on
alone; the node is barred for the cooldown, then a new worker joins and the job is back at 2.
The cooldown range is (4, 8): Horovod bars a host for MIN * 2**failures + U(0, MIN) seconds,
capped at MAX, so a first failure bars it for exactly 8 s, far longer than a respawn takes. (Growth onto an added node and node removal are tested with the real trainer.)

Run as a script so a hang is bounded by the caller's timeout, and so the cluster it starts is
torn down with it.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import ray
import ray.cloudpickle
from ray.cluster_utils import Cluster

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ray_toy_job  # noqa: E402

from hvd_abs.launch.ray_executor import RayElasticExecutor  # noqa: E402
from hvd_abs.elastic.world_signal import write_wanted  # noqa: E402

# Actors cannot import this test folder: ship the toy job's code with the function.
ray.cloudpickle.register_pickle_by_value(ray_toy_job)

STEPS = 80


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("scenario", choices=["crash"])
    p.add_argument("--step-s", type=float, default=0.1)
    args = p.parse_args()

    report: dict = {"scenario": args.scenario}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        with tempfile.TemporaryDirectory(prefix="hvd_abs_ray_") as run_dir:
            write_wanted(run_dir, 2)
            ex = RayElasticExecutor(min_workers=1, max_workers=2, cpus_per_worker=1, run_dir=run_dir,
                                    elastic_timeout=60, cooldown_range=(4, 8))
            ex.start()
            t0 = time.time()
            try:
                # At step 70 the world waits for the second worker, so the rejoin lands before
                # the last ten steps however loaded the machine is.
                report["results"] = ex.run(ray_toy_job.toy_job, (run_dir, STEPS, args.step_s),
                                            {"crash_at": (10, 1), "hold_until_size": {70: 2}})
            except Exception as exc:  # noqa: BLE001 - reported below
                report["error"] = repr(exc)
            finally:
                report["wall_s"] = time.time() - t0
                ex.shutdown()
            crashed = Path(run_dir) / "crashed"
            report["crashed_at"] = crashed.stat().st_mtime if crashed.exists() else None
    finally:
        ray.shutdown()
        cluster.shutdown()
    print("REPORT " + json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
