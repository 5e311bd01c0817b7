"""Host discovery for Horovod on Ray (hvd_abs.launch.ray_executor): the live Ray cluster's nodes
and their worker slots, capped by the job's wanted world size, and the autoscaler requests
when the cluster holds fewer. Ray is imported lazily, on the first poll."""
from __future__ import annotations

import logging
import math
import os
import threading
from typing import Any, Callable, Mapping

from hvd_abs.launch.discovery import select_hosts
from hvd_abs.elastic.world_signal import SignalError, read_wanted

# The logger of ray_executor, which this was split out of: the lines (and any filter on them)
# name the same logger as before.
log = logging.getLogger("hvd_abs.launch.ray_executor")


def node_slots(resources: Mapping[str, float], cpus_per_worker: float, gpus_per_worker: float) -> int:
    """How many workers fit on a node with these total `resources`."""
    # The epsilon keeps 0.3 CPU / 0.1 per worker at 3 despite binary floating point.
    slots = math.floor(resources.get("CPU", 0.0) / cpus_per_worker + 1e-9) if cpus_per_worker > 0 else math.inf
    if gpus_per_worker > 0:
        slots = min(slots, math.floor(resources.get("GPU", 0.0) / gpus_per_worker + 1e-9))
    if slots == math.inf:
        raise ValueError("a worker needs some resource: pass cpus_per_worker > 0 or gpus_per_worker > 0")
    return int(slots)


def target_world_size(wanted: int | None, min_workers: int, max_workers: int) -> int:
    """The world size to advertise: `wanted` clamped to [min_workers, max_workers]; min_workers
    while nothing was published (never more workers than asked for)."""
    return max(min_workers, min(max_workers, wanted if wanted is not None else min_workers))


class RayClusterDiscovery:
    """Horovod `HostDiscovery` over the live Ray cluster, capped by the job's wanted size.

    `find_available_hosts_and_slots()` is polled every second by Horovod's driver thread. It
    returns {node_id: slots} covering `target_world_size(...)` slots, nodes in the order they
    were first seen (so the oldest nodes keep the lowest ranks and a resize never swaps a host
    out for an equal one), `first` (the driver's node) ahead of all: rank 0 runs beside the
    launcher when it can. Without `run_dir` the job wants `max_workers`.

    `nodes` and `request` default to `ray.nodes` and `ray.autoscaler.sdk.request_resources`;
    tests pass fakes.
    """

    def __init__(self, *, min_workers: int, max_workers: int, cpus_per_worker: float = 1.0,
                 gpus_per_worker: float = 0.0, run_dir: str | os.PathLike | None = None,
                 nodes: Callable[[], list[dict[str, Any]]] | None = None,
                 request: Callable[[list[dict[str, float]]], None] | None = None,
                 first: str | None = None) -> None:
        self.min_workers, self.max_workers = min_workers, max_workers
        self.first = first
        self.cpus_per_worker, self.gpus_per_worker = cpus_per_worker, gpus_per_worker
        self.run_dir = run_dir
        self._nodes = nodes
        self._request = request
        self._first_seen: dict[str, int] = {}
        self._lock = threading.Lock()
        self.requested: int | None = None  # workers last asked of the autoscaler; None: never asked
        self._signal_warned = False
        self._short_logged: int | None = None
        # Called with the hosts the job should have, returns those to advertise now (the warm pool).
        self.gate: Callable[[dict[str, int]], dict[str, int]] | None = None
        # Whether the driver bars a node (its worker failed): its slots go to the next node at
        # once, not after Ray has noticed a dead node (seconds to tens of seconds).
        self.barred: Callable[[str], bool] = lambda node_id: False

    # One bundle per worker: the autoscaler packs them onto node types that fit a whole worker.
    def bundle(self) -> dict[str, float]:
        b = {"CPU": float(self.cpus_per_worker)} if self.cpus_per_worker > 0 else {}
        if self.gpus_per_worker > 0:
            b["GPU"] = float(self.gpus_per_worker)
        return b

    def pool(self) -> list[tuple[str, int]]:
        """[(node_id, slots)] of the alive nodes that fit at least one worker, oldest first."""
        if self._nodes is None:
            import ray
            self._nodes = ray.nodes
        pool = []
        for node in self._nodes():
            if not node.get("Alive", node.get("alive", False)):
                continue
            slots = node_slots(node.get("Resources", {}), self.cpus_per_worker, self.gpus_per_worker)
            if slots > 0:
                self._first_seen.setdefault(node["NodeID"], len(self._first_seen))
                pool.append((node["NodeID"], slots))
        return sorted(pool, key=lambda hs: (hs[0] != self.first, self._first_seen[hs[0]]))

    def wanted(self) -> int | None:
        if self.run_dir is None:
            return self.max_workers
        try:
            return read_wanted(self.run_dir)
        except SignalError as exc:
            if not self._signal_warned:  # polled every second: say it once
                log.warning("ignoring a malformed world-size signal (advertising min_workers): %s", exc)
                self._signal_warned = True
            return None

    def find_available_hosts_and_slots(self) -> dict[str, int]:
        with self._lock:
            pool = self.pool()
            target = target_world_size(self.wanted(), self.min_workers, self.max_workers)
            capacity = sum(slots for _, slots in pool)
            self._ask(target, capacity)
            hosts = dict(select_hosts([(h, n) for h, n in pool if not self.barred(h)], target))
            return self.gate(hosts) if self.gate is not None else hosts

    def _ask(self, target: int, capacity: int) -> None:
        """Ask the autoscaler for `target` workers when the cluster holds fewer; once asked,
        keep the request equal to the wanted size (lowering it lets the cluster shrink)."""
        if target <= capacity and (self.requested is None or self.requested == target):
            return
        if target == self.requested:
            return
        if target > capacity and self._short_logged != target:
            log.info("the job wants %d workers, the cluster hosts %d: asking the autoscaler for %d "
                     "bundles of %s", target, capacity, target, self.bundle())
            self._short_logged = target
        self.request([self.bundle()] * target)
        self.requested = target

    def request(self, bundles: list[dict[str, float]]) -> None:
        if self._request is None:
            from ray.autoscaler.sdk import request_resources

            def _request(b: list[dict[str, float]]) -> None:
                request_resources(bundles=b)
            self._request = _request
        self._request(bundles)

    def withdraw(self) -> None:
        """Withdraw a standing autoscaler request (an empty request replaces it)."""
        with self._lock:
            if self.requested is not None:
                self.request([])
                self.requested = None
