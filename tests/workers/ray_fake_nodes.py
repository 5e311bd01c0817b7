"""Hold a `ray.cluster_utils.Cluster` of 1-CPU fake nodes on this machine until stdin closes.

Prints `ADDRESS <head address>` once every node is up, so a test can point
`hvd-abs launch ray --address ADDRESS` at a multi-node cluster; closing stdin (or killing this
process's descendants) tears the cluster down.
"""
from __future__ import annotations

import argparse
import sys

from ray.cluster_utils import Cluster


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--nodes", type=int, default=2, help="fake nodes in all, the head included")
    args = p.parse_args()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        for _ in range(args.nodes - 1):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        print(f"ADDRESS {cluster.address}", flush=True)
        sys.stdin.read()  # until the test closes our stdin
    finally:
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
