"""Run the toy elastic job on a fake two-node Ray cluster and print one JSON report.

Scenario `crash` (`ray.cluster_utils.Cluster`, two 1-CPU fake nodes, one worker per node, wanted
2): rank 1's process exits at step 10 (a dead actor, node alive): rank 0 rolls back and goes on
alone; the node is barred for the cooldown (1-5 s), then a new worker joins and the job is back
at 2. (Growth onto an added node and node removal are tested with the real trainer.)

Run as a script so a hang is bounded by the caller's timeout, and so the cluster it starts is
torn down with it.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import ray
import ray.cloudpickle
from ray.cluster_utils import Cluster

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ray_toy_job  # noqa: E402

from hvd_abs.elastic.ray_executor import RayElasticExecutor  # noqa: E402
from hvd_abs.elastic.world_signal import write_wanted  # noqa: E402

# Actors cannot import this test folder: ship the toy job's code with the function.
ray.cloudpickle.register_pickle_by_value(ray_toy_job)

STEPS = 80


def wait_size(run_dir: str, size: int, stop: threading.Event, timeout: float = 90.0) -> bool:
    deadline = time.time() + timeout
    while not stop.is_set() and time.time() < deadline:
        if ray_toy_job.read_progress(run_dir)["size"] == size:
            return True
        time.sleep(0.05)
    return False


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
            stop = threading.Event()
            ex = RayElasticExecutor(min_workers=1, max_workers=2, cpus_per_worker=1, run_dir=run_dir,
                                    elastic_timeout=60, cooldown_range=(1, 5))
            ex.start()
            outcome: dict = {}

            def job() -> None:
                t0 = time.time()
                try:
                    # The gate at step 70 (rank 0 waits for the file) makes sure the worker has
                    # rejoined before the last ten steps however loaded the machine is.
                    outcome["results"] = ex.run(ray_toy_job.toy_job, (run_dir, STEPS, args.step_s),
                                                {"crash_at": (10, 1), "hold_at": {70: "rejoined"}})
                except BaseException as exc:  # noqa: BLE001 - reported below
                    outcome["error"] = repr(exc)
                finally:
                    report["wall_s"] = time.time() - t0
                    stop.set()

            runner = threading.Thread(target=job, daemon=True)
            runner.start()
            try:
                if wait_size(run_dir, 1, stop) and wait_size(run_dir, 2, stop):
                    (Path(run_dir) / "rejoined").touch()
                runner.join()
            finally:
                stop.set()
                ex.shutdown()
            if "error" in outcome:
                report["error"] = outcome["error"]
            report["results"] = outcome.get("results")
    finally:
        ray.shutdown()
        cluster.shutdown()
    print("REPORT " + json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
