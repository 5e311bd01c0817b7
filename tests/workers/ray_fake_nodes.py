"""Hold a `ray.cluster_utils.Cluster` of 1-CPU fake nodes on this machine, changed on command.

Prints `ADDRESS <head address>` once the first `--nodes` nodes are up, then reads commands from
stdin, one per line, and answers each with one line:
    add      a 1-CPU node joins             -> `ADDED <node id>`
    remove   the newest non-head node goes   -> `REMOVED <node id>`
    request  the standing autoscaler request -> `REQUEST <json [[bundle, count], ...]>`, read
             back from the GCS (see `standing_request`)
Closing stdin (or killing this process's descendants) tears the cluster down. Nodes are added and
removed from this process's main thread: Ray does that only there (signal handlers).

`FakeRayCluster` (for tests and benchmarks) starts this script and speaks the protocol; this
module imports Ray only when run as the holder.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path


def standing_request() -> list[list]:
    """What `ray.autoscaler.sdk.request_resources` left for the autoscaler, as [[bundle, count]]:
    the GCS's autoscaler state on an autoscaler-v2 cluster, else the v1 request key of the GCS's
    internal KV (a JSON list of bundles), the two places that call writes to."""
    import ray
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


LOOPBACK = "127.0.0.1"


class FakeClusterError(RuntimeError):
    """The holder did not start or did not answer a command."""


class FakeRayCluster:
    """The client: starts this script as a child process of its own session (a hang or a crash
    never leaves a cluster behind) and sends it commands."""

    def __init__(self, nodes: int) -> None:
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--nodes", str(nodes)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, start_new_session=True)
        self.address = self._answer("ADDRESS", timeout=120)

    def _answer(self, tag: str, timeout: float = 60) -> str:
        """The next line starting with `tag` (other output, e.g. from Ray, is skipped)."""
        box: list[str] = []

        def read() -> None:  # in a thread: readline() itself cannot time out
            for line in self.proc.stdout:
                if line.startswith((tag + " ", "ERROR ")):
                    box.append(line)
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout)
        line = box[0] if box else ""
        if not line.startswith(tag + " "):
            self.close()
            raise FakeClusterError(f"the fake Ray cluster answered {line!r} (wanted {tag} within {timeout}s)")
        return line[len(tag) + 1:].strip()

    def command(self, cmd: str, tag: str) -> str:
        try:
            self.proc.stdin.write(cmd + "\n")
            self.proc.stdin.flush()
        except OSError as exc:  # the holder died
            self.close()
            raise FakeClusterError(f"the fake Ray cluster is gone ({exc}) before {cmd!r}") from None
        return self._answer(tag)

    def add_node(self) -> str:
        return self.command("add", "ADDED")

    def remove_node(self) -> str:
        return self.command("remove", "REMOVED")

    def autoscaler_request(self) -> list:
        """The standing `request_resources` request as the GCS holds it: [[bundle, count], ...]."""
        return json.loads(self.command("request", "REQUEST"))

    def __enter__(self) -> "FakeRayCluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.proc.stdin.close()  # the holder shuts the cluster down
            self.proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)


def main() -> int:
    import ray
    from ray.cluster_utils import Cluster

    p = argparse.ArgumentParser()
    p.add_argument("--nodes", type=int, default=2, help="fake nodes at the start, the head included")
    args = p.parse_args()
    # Every node on loopback: the tests' traffic (Ray's and Horovod's) stays on this machine.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                            "node_ip_address": LOOPBACK})
    added = []
    try:
        for _ in range(args.nodes - 1):
            added.append(cluster.add_node(num_cpus=1, node_ip_address=LOOPBACK))
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        print(f"ADDRESS {cluster.address}", flush=True)
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "add":
                added.append(cluster.add_node(num_cpus=1, node_ip_address=LOOPBACK))
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
