"""Run the toy elastic job on a fake multi-node Ray cluster and print one JSON report.

Scenarios (`ray.cluster_utils.Cluster`, 1-CPU fake nodes, one worker per node):
- grow:   one node, wanted 1. A second node joins at step 3 (the job stays at 1: it wants 1);
          the job asks for 2 at step 20 and grows; it asks for 3 at step 35 (max 3) with room
          for 2: the executor asks the autoscaler, observed in the GCS autoscaler state.
- shrink: two nodes, wanted 2; the second node is removed at step 10 mid-run: its worker dies,
          the survivor rolls back to the last commit and finishes alone.
- crash:  two nodes, wanted 2; rank 1's process exits at step 10 (a dead actor, node alive):
          rank 0 rolls back and goes on alone; the node is barred for the cooldown (1-5 s),
          then a new worker joins and the job is back at 2.

Run as a script so a hang is bounded by the caller's timeout, and so the cluster it starts is
torn down with it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

# The autoscaler v2 path: request_resources goes to the GCS autoscaler state, where it is read back.
os.environ.setdefault("RAY_enable_autoscaler_v2", "1")

import ray  # noqa: E402
import ray.cloudpickle  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ray_toy_job  # noqa: E402

from hvd_abs.elastic.ray_executor import RayElasticExecutor  # noqa: E402
from hvd_abs.elastic.world_signal import write_wanted  # noqa: E402

# Actors cannot import this test folder: ship the toy job's code with the function.
ray.cloudpickle.register_pickle_by_value(ray_toy_job)


def autoscaler_request() -> list[tuple[dict[str, float], int]]:
    """The standing resource request as the GCS holds it for the autoscaler: [(bundle, count)]."""
    from ray.autoscaler.v2.sdk import get_cluster_resource_state

    state = get_cluster_resource_state(ray._private.worker.global_worker.gcs_client)
    return [(dict(r.request.resources_bundle), int(r.count))
            for c in state.cluster_resource_constraints for r in c.resource_requests]


def wait_step(run_dir: str, step: int, stop: threading.Event, timeout: float = 90.0) -> bool:
    deadline = time.time() + timeout
    while not stop.is_set() and time.time() < deadline:
        if ray_toy_job.read_progress(run_dir)["step"] >= step:
            return True
        time.sleep(0.05)
    return False


def wait_size(run_dir: str, size: int, stop: threading.Event, timeout: float = 90.0) -> bool:
    deadline = time.time() + timeout
    while not stop.is_set() and time.time() < deadline:
        if ray_toy_job.read_progress(run_dir)["size"] == size:
            return True
        time.sleep(0.05)
    return False


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("scenario", choices=["grow", "shrink", "crash"])
    p.add_argument("--step-s", type=float, default=0.1)
    args = p.parse_args()

    report: dict = {"scenario": args.scenario, "events": {}}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        extra = cluster.add_node(num_cpus=1) if args.scenario in ("shrink", "crash") else None
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        with tempfile.TemporaryDirectory(prefix="hvd_abs_ray_") as run_dir:
            if args.scenario == "grow":
                steps, wanted_at, max_workers = 50, {20: 2, 35: 3}, 3
                write_wanted(run_dir, 1)
            elif args.scenario == "shrink":
                steps, wanted_at, max_workers = 30, {}, 2
                write_wanted(run_dir, 2)
            else:
                steps, wanted_at, max_workers = 80, {}, 2
                write_wanted(run_dir, 2)
            crash_at = (10, 1) if args.scenario == "crash" else None
            # Gates (rank 0 waits at a step until this script touches a file) pin each cluster
            # change to a known step however loaded the machine is. grow: the second node is up
            # ten steps (over a discovery poll) before the job wants it, and the job has grown
            # before it asks for 3. shrink: the node goes while rank 0 waits at step 10. crash:
            # the worker has rejoined before the last ten steps.
            hold_at = {"grow": {10: "node_added", 34: "grown"}, "shrink": {10: "node_removed"},
                       "crash": {70: "rejoined"}}[args.scenario]
            stop = threading.Event()
            seen: list = []
            ex = RayElasticExecutor(min_workers=1, max_workers=max_workers, cpus_per_worker=1, run_dir=run_dir,
                                    elastic_timeout=60, cooldown_range=(1, 5))
            ex.start()
            outcome: dict = {}

            def job() -> None:
                # In a thread: Ray adds and removes nodes only from the main thread (signal handlers).
                t0 = time.time()
                try:
                    outcome["results"] = ex.run(ray_toy_job.toy_job, (run_dir, steps, args.step_s, wanted_at),
                                                {"crash_at": crash_at, "hold_at": hold_at})
                except BaseException as exc:  # noqa: BLE001 - reported below
                    outcome["error"] = repr(exc)
                finally:
                    report["wall_s"] = time.time() - t0
                    stop.set()

            runner = threading.Thread(target=job, daemon=True)
            runner.start()
            try:
                if args.scenario == "grow":
                    if wait_step(run_dir, 3, stop):
                        extra = cluster.add_node(num_cpus=1)
                        cluster.wait_for_nodes()
                        report["events"]["node_added_step"] = ray_toy_job.read_progress(run_dir)["step"]
                        (Path(run_dir) / "node_added").touch()
                    if wait_size(run_dir, 2, stop):
                        (Path(run_dir) / "grown").touch()
                    if wait_step(run_dir, 36, stop):
                        deadline = time.time() + 20
                        while time.time() < deadline and not stop.is_set():
                            req = autoscaler_request()
                            if req:
                                seen.append(req)
                                break
                            time.sleep(0.2)
                elif args.scenario == "shrink":
                    if wait_step(run_dir, 10, stop):
                        report["events"]["node_removed_step"] = ray_toy_job.read_progress(run_dir)["step"]
                        cluster.remove_node(extra)
                        (Path(run_dir) / "node_removed").touch()
                else:
                    if wait_size(run_dir, 1, stop) and wait_size(run_dir, 2, stop):
                        (Path(run_dir) / "rejoined").touch()
                runner.join()
                report["request_during_run"] = seen[0] if seen else None
                report["discovery_requested"] = ex.discovery.requested
            finally:
                stop.set()
                ex.shutdown()
                report["request_after_shutdown"] = autoscaler_request()
            if "error" in outcome:
                report["error"] = outcome["error"]
            results = outcome.get("results")
            report["results"] = results
    finally:
        ray.shutdown()
        cluster.shutdown()
    print("REPORT " + json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
