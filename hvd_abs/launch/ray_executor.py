"""Elastic Horovod on a Ray cluster: Horovod's own elastic driver, Ray actors as the workers.

This module and its parts (ray_discovery: the cluster's nodes and slots; ray_warm_pool: warm
joins; ray_workers: what runs in the actors) are the only modules of the project that import
Ray and `horovod.runner`; both are imported lazily so `hvd-abs --help` and the horovodrun path
never pay for them. The names of those parts are importable from here too.

Why not `horovod.ray`: its elastic executors do not start on Ray 2.60 (`MiniSettings` has no
`discovery`, the older one rejects `min_workers`), they use Ray APIs Ray removed (`ray.state`,
`RuntimeContext.node_id`), and they name hosts by IP and pin actors with `node:<IP>` resources,
so two Ray nodes on one machine (or two raylets sharing an IP) collapse into one host. Fixing
that means overriding discovery, worker creation and the run loop: most of the adapter. What is
kept is the part that holds the semantics, used as is, the same objects `horovodrun` runs:
`ElasticDriver` (host updates, rank assignment, blacklisting, resets), `RendezvousServer` +
`create_rendezvous_handler` (Gloo rendezvous, worker notification registration) and
`create_run_env_vars` / `create_slot_env_vars` (what a worker sees). What is Ray's:

- Hosts are Ray nodes, named by node ID (unique even for fake nodes on one machine); a node
  offers `min(CPU // cpus_per_worker, GPU // gpus_per_worker)` slots from its total resources.
- The slots advertised to the driver are the first `min(max_workers, max(min_workers, wanted))`
  of the cluster's, oldest node first, with `wanted` read from the job's world-size signal
  (`hvd_abs.elastic.world_signal`): workers join exactly when the batch grows, as on horovodrun.
- A worker is an actor pinned to its node (hard node affinity) with the per-worker resources;
  a dead actor or a removed node is a failed worker: survivors get HorovodInternalError, roll
  back to the last commit and continue (`hvd_abs.elastic.hvd_runner.run_elastic`).
- Warm joins (`run(..., warmup=...)`, on by default in `hvd-abs launch ray`): a new slot is
  offered to the driver only once an actor on its node has run the warm-up (imports, data set),
  and the driver's worker for that slot is that actor (WarmPool): the running workers go on,
  accumulating, instead of waiting for a cold start at the rendezvous.
- When the job wants more workers than the cluster can host, the executor asks the autoscaler
  for them with `ray.autoscaler.sdk.request_resources` (one bundle per worker; a no-op on a
  fixed cluster); the request follows the wanted size from then on and is withdrawn at shutdown.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from hvd_abs.errors import UserError
from hvd_abs.launch.ray_discovery import RayClusterDiscovery, node_slots, target_world_size
from hvd_abs.launch.ray_warm_pool import WARM_TIMEOUT_S, WarmPool
from hvd_abs.launch.ray_workers import (ScriptRefused, _Worker, script_worker, train_worker, warm_script_worker,
                                        warm_train_worker)

# (Re-exported: the executor's users import these from here.)
__all__ = ["BoundRendezvousServer", "RayAuthError", "RayClusterDiscovery", "RayElasticExecutor", "RayExecutorError", "ScriptRefused",
           "WARM_TIMEOUT_S", "WarmPool", "node_slots", "script_worker", "target_world_size", "train_worker",
           "warm_script_worker", "warm_train_worker"]

log = logging.getLogger(__name__)

# Seconds between polls of a worker's future for completion or a stop event; the driver's own
# host discovery polls every second, so this is not the resize latency.
_POLL_S = 0.2


class RayAuthError(ConnectionError):
    """The Ray cluster wants token authentication this process cannot give: the message names
    what to set."""


class RayExecutorError(RuntimeError):
    """The elastic job on Ray failed (a worker's error, or the driver gave up). input_error: the
    message when a worker refused its input (a UserError, or a script's "Error:" exit 2)."""

    def __init__(self, message: str, input_error: str | None = None) -> None:
        super().__init__(message)
        self.input_error = input_error


def _local_network(driver_ip: str) -> tuple[str, str]:
    """(network interface, driver address) for Horovod's traffic: the way Ray's own goes, the
    interface holding this node's Ray IP (loopback for a cluster on loopback). Not judged from
    the nodes of the moment: a node joining later from another machine must reach the job."""
    import ipaddress
    import psutil
    import socket

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == driver_ip for a in addrs):
            return name, driver_ip
    if ipaddress.ip_address(driver_ip).is_loopback:
        return "lo", driver_ip
    raise RayExecutorError(f"no network interface holds the driver's IP {driver_ip}: pass nic=NAME "
                           f"(`--network-interface`) naming the interface that reaches every node")


def BoundRendezvousServer(address: str, verbose: int = 0) -> Any:
    """Horovod's Gloo rendezvous server (an HTTP key-value store without authentication),
    listening on `address` only. Horovod's `RendezvousServer.start` binds every interface
    (`('', port)`); workers only ever reach it at the address they are given."""
    from horovod.runner.http.http_server import RendezvousHTTPServer, RendezvousServer
    from horovod.runner.util.network import find_port
    from horovod.runner.util.threads import in_thread

    class _Bound(RendezvousServer):
        def start(self, handler_cls: Any) -> int:
            self._httpd, port = find_port(lambda addr: RendezvousHTTPServer((address, addr[1]), handler_cls,
                                                                            self._verbose))
            self._listen_thread = in_thread(target=self._httpd.serve_forever)
            return port

    return _Bound(verbose=verbose)


# ---------------------------------------------------------------------------------------------
# The executor
# ---------------------------------------------------------------------------------------------

class RayElasticExecutor:
    """Run a function as an elastic Horovod job whose workers are Ray actors.

    Args (defaults in brackets):
        min_workers [1]: fewest workers to run with; the job waits (up to `elastic_timeout`) below it.
        max_workers [8]: most workers, whatever the signal or the cluster offers.
        cpus_per_worker [1.0], gpus_per_worker [0.0]: Ray resources each worker actor holds.
        address [None]: Ray cluster to join when Ray is not initialised yet: "auto", "HOST:PORT",
            or "local" (a new single-machine cluster, no dashboard). None: "auto". When Ray is
            already initialised in this process, that connection is used.
        run_dir [None]: the job's run directory; its world-size signal caps the workers. None:
            always `max_workers` (as many as the cluster hosts).
        env [None]: extra environment variables for every worker (`.env`, may be added to before run()).
        nic [None]: network interface for Horovod's traffic; None: the interface holding the
            driver's Ray node IP ("lo" for a cluster this executor started, `address="local"`).
        elastic_timeout [600]: seconds to wait for min_workers slots.
        cooldown_range [(5, 30)]: seconds (min, max) a node whose worker failed stays barred;
            None bars it for good (Horovod's default).
        reset_limit [None]: most resets before the job is stopped; None: unbounded.

    Use: `start()`, then `run(fn, args, kwargs)` any number of times (each is one elastic job),
    then `shutdown()`; or `with RayElasticExecutor(...) as ex: ex.run(...)`. `fn` must be
    picklable (a module-level function) and run Horovod elastic itself, e.g. through
    `hvd_abs.elastic.hvd_runner.run_elastic`. `run` returns the values of the workers that
    finished, ordered by their final rank.
    """

    def __init__(self, *, min_workers: int = 1, max_workers: int = 8, cpus_per_worker: float = 1.0,
                 gpus_per_worker: float = 0.0, address: str | None = None,
                 run_dir: str | os.PathLike | None = None, env: Mapping[str, str] | None = None,
                 nic: str | None = None, elastic_timeout: int = 600,
                 cooldown_range: tuple[int, int] | None = (5, 30), reset_limit: int | None = None,
                 warm_timeout: float = WARM_TIMEOUT_S) -> None:
        for name, value in (("min_workers", min_workers), ("max_workers", max_workers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if max_workers < min_workers:
            raise ValueError(f"max_workers ({max_workers}) must be at least min_workers ({min_workers})")
        if cpus_per_worker < 0 or gpus_per_worker < 0 or (cpus_per_worker == 0 and gpus_per_worker == 0):
            raise ValueError(f"pass cpus_per_worker >= 0 and gpus_per_worker >= 0, not both 0 "
                             f"(got {cpus_per_worker}, {gpus_per_worker})")
        if cooldown_range is not None and not (1 <= cooldown_range[0] <= cooldown_range[1] <= 3600):
            raise ValueError(f"cooldown_range must be (MIN, MAX) seconds with 1 <= MIN <= MAX <= 3600, "
                             f"got {cooldown_range!r}")
        if not warm_timeout >= 0:
            raise ValueError(f"warm_timeout must be >= 0 seconds, got {warm_timeout!r}")
        self.warm_timeout = float(warm_timeout)
        if env is not None and any(not isinstance(k, str) or k.startswith("HOROVOD_") for k in env):
            raise ValueError("env: pass string names, and no HOROVOD_* variables (the executor sets those)")
        self.min_workers, self.max_workers = min_workers, max_workers
        self.cpus_per_worker, self.gpus_per_worker = float(cpus_per_worker), float(gpus_per_worker)
        self.address = address
        self.run_dir = None if run_dir is None else str(Path(run_dir).resolve())
        self.env = dict(env or {})
        self.nic = nic
        self.elastic_timeout = elastic_timeout
        self.cooldown_range = cooldown_range
        self.reset_limit = reset_limit
        self.discovery: RayClusterDiscovery | None = None
        self._owns_ray = False
        self._network: tuple[str, str] | None = None

    def __enter__(self) -> "RayElasticExecutor":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def start(self) -> None:
        """Connect to Ray (unless connected) and choose the network for Horovod's traffic."""
        import ray

        if not ray.is_initialized():
            address = self.address or "auto"
            kwargs: dict[str, Any] = {"include_dashboard": False} if address == "local" else {}
            if address == "local":  # the workers are the training job: not below the launcher (Ray's default 15)
                os.environ.setdefault("RAY_worker_niceness", "0")
            log.info("connecting to Ray at %s", address)
            if not sys.stdout.isatty():  # the workers' lines without colour codes in a log file or pipe
                os.environ.setdefault("RAY_COLOR_PREFIX", "0")
            try:
                ray.init(address=address, **kwargs)
            except Exception as exc:  # noqa: BLE001 - Ray's own error types vary by version: judged by content
                from hvd_abs.launch.ray_address import auth_problem
                why = auth_problem(exc, address)
                if why is None:
                    raise
                raise RayAuthError(why) from None
            self._owns_ray = True
        driver_ip = ray.util.get_node_ip_address()
        if self.nic is not None:
            self._network = (self.nic, driver_ip)
        elif self._owns_ray and self.address == "local":  # a new cluster of this machine alone
            self._network = ("lo", "127.0.0.1")
        else:
            self._network = _local_network(driver_ip)
        self.discovery = RayClusterDiscovery(
            min_workers=self.min_workers, max_workers=self.max_workers, cpus_per_worker=self.cpus_per_worker,
            gpus_per_worker=self.gpus_per_worker, run_dir=self.run_dir, first=ray.get_runtime_context().get_node_id())
        log.info("Ray executor ready: %d..%d workers of %s, Horovod over %s", self.min_workers,
                 self.max_workers, self.discovery.bundle(), self._network[0])

    @property
    def driver_address(self) -> str:
        """The address of this process that every worker reaches (after start())."""
        if self._network is None:
            raise RayExecutorError("call start() first")
        return self._network[1]

    @property
    def spans_machines(self) -> bool:
        """Whether Horovod's traffic leaves this machine (after start()): nodes on other machines."""
        return self._network is not None and self._network[0] != "lo"

    def run(self, fn: Callable[..., Any], args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, *,
            warmup: Callable[[], Any] | None = None) -> list[Any]:
        """Run `fn(*args, **kwargs)` on every worker as one elastic job; return the finished
        workers' values by final rank. Raises RayExecutorError when the job fails.
        `warmup` (picklable, no arguments): run by each worker actor before its slot is offered
        to the job (see WarmPool), so joins do not stall the running workers on imports."""
        import ray
        from horovod.runner.elastic.driver import ElasticDriver
        from horovod.runner.elastic.rendezvous import create_rendezvous_handler
        from horovod.runner.gloo_run import create_run_env_vars, create_slot_env_vars
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if self.discovery is None or self._network is None:
            raise RayExecutorError("call start() before run()")
        kwargs = dict(kwargs or {})
        try:
            ray.cloudpickle.dumps((fn, tuple(args), kwargs, warmup))
        except Exception as exc:  # noqa: BLE001 - any pickling failure is the caller's to fix
            raise TypeError(f"fn and its arguments must be picklable (use a module-level function): {exc}") from None

        remote_worker = ray.remote(_Worker)
        results: dict[int, Any] = {}
        errors: list[str] = []
        refused: list[str] = []  # what workers that refused their input said (RayExecutorError.input_error)
        lock = threading.Lock()

        def new_actor(node_id: str) -> Any:
            return remote_worker.options(
                num_cpus=self.cpus_per_worker, num_gpus=self.gpus_per_worker, max_restarts=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
            ).remote()

        def warm_actor(node_id: str) -> tuple[Any, Any]:
            actor = new_actor(node_id)
            return actor, actor.warm.remote(warmup, self.env)

        def warmed(ref: Any) -> bool:
            return bool(ray.wait([ref], timeout=0)[0]) and ray.get(ref)

        # Gated before the driver exists: its discovery thread polls from construction on, and a
        # host it was offered must never vanish from a later answer.
        pool = None if warmup is None else WarmPool(warm_actor, warmed, lambda a: ray.kill(a, no_restart=True),
                                                    cold_after_s=self.warm_timeout)
        self.discovery.gate = pool

        driver = None
        try:  # from here on the pool may hold actors: always closed
            nic, server_ip = self._network
            # Listens on the address the workers are given only (loopback on one machine), not on
            # every interface as Horovod's own does: its HTTP key-value store has no authentication.
            rendezvous = BoundRendezvousServer(server_ip)
            driver = ElasticDriver(rendezvous, self.discovery, min_num_proc=self.min_workers,
                                   max_num_proc=self.max_workers, timeout=self.elastic_timeout,
                                   reset_limit=self.reset_limit, cooldown_range=self.cooldown_range)
            # Barred: in its cooldown. A host past it must be offered again, or Horovod never lets
            # it back. (The driver's HostManager holds that record; Horovod has no public getter.)
            def barred(node_id: str) -> bool:
                state = driver._host_manager._hosts_state.get(node_id)
                return state is not None and state.is_blacklisted() and not state.is_resurrected()

            self.discovery.barred = barred
            port = rendezvous.start(create_rendezvous_handler(driver))
            base_env = {**{k: str(v) for k, v in create_run_env_vars(server_ip, [nic], port, elastic=True).items()},
                        "PYTHONUNBUFFERED": "1", **self.env}

            def create_worker(slot_info: Any, events: list[threading.Event]) -> tuple[int, float]:
                """Horovod's worker-creation hook: one actor per slot, (exit code, time) when it ends."""
                env = {**base_env, **create_slot_env_vars(slot_info)}
                actor = (pool.take(slot_info.hostname) if pool is not None else None) or new_actor(slot_info.hostname)
                ref = actor.run.remote(env, fn, tuple(args), kwargs)
                code = 1
                try:
                    while True:
                        ready, _ = ray.wait([ref], timeout=_POLL_S)
                        if ready:
                            try:
                                rank, value = ray.get(ref)
                            except Exception as exc:  # noqa: BLE001 - a dead actor or fn's error: a failed worker
                                # RayTaskError wraps fn's own exception as .cause: name that, not the wrapper.
                                cause = getattr(exc, "cause", None) or exc
                                brief = f"{type(cause).__name__}: {cause}".splitlines()[0]
                                if not driver.has_rank_assignment(slot_info.hostname, slot_info.local_rank):
                                    # A shrink dropped its slot: Horovod ends such a worker at re-init.
                                    log.info("worker on node %s (local rank %d) left the job: %s",
                                             slot_info.hostname[:12], slot_info.local_rank, brief)
                                else:
                                    log.warning("worker on node %s (local rank %d) failed: %s", slot_info.hostname[:12],
                                                slot_info.local_rank, brief)
                                    log.debug("worker error in full: %s", exc)
                                    with lock:
                                        errors.append(brief)
                                        if isinstance(cause, (UserError, ScriptRefused)):
                                            refused.append(" ".join(str(cause).split()))
                            else:
                                with lock:
                                    results[rank] = value
                                code = 0
                            break
                        if any(e.is_set() for e in events):  # the job stopped, or this node was barred
                            break
                finally:
                    # Ends the process on success too: frees the node's resources for the next run.
                    ray.kill(actor, no_restart=True)
                return code, time.time()

            log.info("elastic job on Ray: waiting for %d worker slot(s)", self.min_workers)
            driver.wait_for_available_slots(self.min_workers)
            driver.start(self.min_workers, create_worker)
            res = driver.get_results()
        finally:
            if driver is not None:
                driver.stop()
            self.discovery.gate = None
            self.discovery.barred = lambda node_id: False
            if pool is not None:
                pool.close()
                log.info("warm joins: %d of the job's workers started warm", pool.warm_taken)
        if res.error_message is not None:
            raise RayExecutorError(res.error_message)
        failed = sorted(name for name, (code, _) in res.worker_results.items() if code != 0)
        if failed or not results:
            detail = errors[-1] if errors else "no worker finished"
            # A refusal is the job's outcome only when every worker that failed refused its input.
            raise RayExecutorError(f"worker {', '.join(failed) or '(none finished)'} failed: {detail}",
                                   input_error=refused[-1] if refused and len(refused) == len(errors) else None)
        return [results[r] for r in sorted(results)]

    def shutdown(self) -> None:
        """Withdraw any autoscaler request; disconnect from Ray if start() connected."""
        import ray

        if self.discovery is not None and ray.is_initialized():
            try:
                self.discovery.withdraw()
            except Exception as exc:  # noqa: BLE001 - shutting down: report, do not mask the caller's error
                log.warning("could not withdraw the autoscaler request: %s", exc)
        self.discovery = None
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
        self._owns_ray = False
