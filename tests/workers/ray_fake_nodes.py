"""Hold a `ray.cluster_utils.Cluster` of 1-CPU fake nodes on this machine, changed on command.

Prints `ADDRESS <head address>` once the first `--nodes` nodes are up, then reads commands from
stdin, one per line, and answers each with one line:
    add      a 1-CPU node joins             -> `ADDED <node id>`
    remove   the newest non-head node goes   -> `REMOVED <node id>`
    request  the standing autoscaler request -> `REQUEST <json [[bundle, count], ...]>`, read
             back from the GCS (see `standing_request`)
Closing stdin (or killing this process's descendants) tears the cluster down. Nodes are added and
removed from this process's main thread: Ray does that only there (signal handlers).
"""
from __future__ import annotations

import argparse
import json
import sys

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402


def standing_request() -> list[list]:
    """What `ray.autoscaler.sdk.request_resources` left for the autoscaler, as [[bundle, count]]:
    the GCS's autoscaler state on an autoscaler-v2 cluster, else the v1 request key of the GCS's
    internal KV (a JSON list of bundles), the two places that call writes to."""
    from ray._private.ray_constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.autoscaler.v2.utils import is_autoscaler_v2
    from ray.experimental.internal_kv import _internal_kv_get

    if is_autoscaler_v2(fetch_from_server=True):
        from ray.autoscaler.v2.sdk import get_cluster_resource_state

        state = get_cluster_resource_state(ray._private.worker.global_worker.gcs_client)
        return [[dict(r.request.resources_bundle), int(r.count)]
                for c in state.cluster_resource_constraints for r in c.resource_requests]
    counts: list[list] = []
    for bundle in json.loads(_internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL) or b"[]"):
        same = [c for c in counts if c[0] == bundle]
        if same:
            same[0][1] += 1
        else:
            counts.append([bundle, 1])
    return counts


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--nodes", type=int, default=2, help="fake nodes at the start, the head included")
    args = p.parse_args()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    added = []
    try:
        for _ in range(args.nodes - 1):
            added.append(cluster.add_node(num_cpus=1))
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        print(f"ADDRESS {cluster.address}", flush=True)
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "add":
                added.append(cluster.add_node(num_cpus=1))
                cluster.wait_for_nodes()
                print(f"ADDED {added[-1].node_id}", flush=True)
            elif cmd == "remove" and added:
                node = added.pop()
                cluster.remove_node(node)
                print(f"REMOVED {node.node_id}", flush=True)
            elif cmd == "request":
                print(f"REQUEST {json.dumps(standing_request())}", flush=True)
            else:
                print(f"ERROR unknown or impossible command {cmd!r}", flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
