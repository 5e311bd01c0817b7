"""Elastic Horovod on a Ray cluster: Horovod's own elastic driver, Ray actors as the workers.

The only module of the project that imports Ray and `horovod.runner`; both are imported lazily
so `hvd-abs --help` and the horovodrun path never pay for them.

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
import math
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from hvd_abs.launch.discovery import select_hosts
from hvd_abs.errors import Refused, UserError
from hvd_abs.elastic.world_signal import SignalError, read_wanted

log = logging.getLogger(__name__)

# How long a joining worker may warm up before its slot is offered anyway (--warm-timeout).
WARM_TIMEOUT_S = 60.0

# Seconds between polls of a worker's future for completion or a stop event; the driver's own
# host discovery polls every second, so this is not the resize latency.
_POLL_S = 0.2


class RayExecutorError(RuntimeError):
    """The elastic job on Ray failed (a worker's error, or the driver gave up). input_error: the
    message when a worker refused its input (a UserError, or a script's "Error:" exit 2)."""

    def __init__(self, message: str, input_error: str | None = None) -> None:
        super().__init__(message)
        self.input_error = input_error


class ScriptRefused(RuntimeError):
    """A worker (`hvd-abs train` or a --script) exited 2 after saying why in one line
    (hvd_abs.errors.exit_2): it refused its input."""


def _refusal(exc: SystemExit) -> ScriptRefused | None:
    """The refusal a worker's SystemExit stands for: exit_2's Refused, which carries its line."""
    return ScriptRefused(exc.message) if isinstance(exc, Refused) else None


# ---------------------------------------------------------------------------------------------
# Host discovery: the live Ray cluster meets the wanted world size
# ---------------------------------------------------------------------------------------------

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
    out for an equal one). Without `run_dir` the job wants `max_workers`.

    `nodes` and `request` default to `ray.nodes` and `ray.autoscaler.sdk.request_resources`;
    tests pass fakes.
    """

    def __init__(self, *, min_workers: int, max_workers: int, cpus_per_worker: float = 1.0,
                 gpus_per_worker: float = 0.0, run_dir: str | os.PathLike | None = None,
                 nodes: Callable[[], list[dict[str, Any]]] | None = None,
                 request: Callable[[list[dict[str, float]]], None] | None = None) -> None:
        self.min_workers, self.max_workers = min_workers, max_workers
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
        return sorted(pool, key=lambda hs: self._first_seen[hs[0]])

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
            hosts = dict(select_hosts(pool, target))
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


# ---------------------------------------------------------------------------------------------
# The worker actor
# ---------------------------------------------------------------------------------------------

class _Worker:
    """One Horovod worker process (made a Ray actor by the executor)."""

    def warm(self, warmup: Callable[[], Any], env: Mapping[str, str]) -> bool:
        """The cold part of a join (imports, data), run before the slot is advertised, under the
        job's extra environment (cache directories, thread counts are read on first use)."""
        os.environ.update({k: str(v) for k, v in env.items()})
        warmup()
        return True

    def run(self, env: Mapping[str, str], fn: Callable[..., Any], args: Sequence[Any],
            kwargs: Mapping[str, Any]) -> tuple[int, Any]:
        # Before fn runs: Horovod's init and notification manager read these from os.environ.
        os.environ.update({k: str(v) for k, v in env.items()})
        value = fn(*args, **kwargs)
        rank = _final_rank(int(env["HOROVOD_RANK"]))
        _shut_down_horovod()
        return rank, value


@dataclass
class _Standby:
    """An actor warming up (or warm) for a slot of one host."""

    actor: Any
    ref: Any
    started: float
    ready: bool = False
    offered: bool = False  # its slot is in the answer to the driver, its worker not created yet


class WarmPool:
    """Warm joins on Ray: a slot is advertised to Horovod's driver only once an actor on its node
    has run the job's warm-up (imports, data set), so survivors never wait on a cold start; the
    job goes on (accumulating) meanwhile. The driver's worker for that slot then takes the warm
    actor. A slot whose actor is still warming after `cold_after_s` is advertised anyway (its
    run queues behind the warm-up on the same actor). An actor whose warm-up fails is dropped
    and replaced; after `max_failures` failed warm-ups the pool goes cold (slots offered at once).

    `start(host) -> (actor, ready_ref)`, `done(ref) -> bool` (raises the warm-up's error) and
    `kill(actor)` are Ray calls in the executor; tests pass fakes.
    """

    def __init__(self, start: Callable[[str], tuple[Any, Any]], done: Callable[[Any], bool],
                 kill: Callable[[Any], None], cold_after_s: float = WARM_TIMEOUT_S, max_failures: int = 2,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._start, self._done, self._kill = start, done, kill
        self.cold_after_s, self.max_failures, self._clock = cold_after_s, max_failures, clock
        self._lock = threading.Lock()
        self.advertised: dict[str, int] = {}  # slots in the last answer: workers + offered standbys
        self._standby: dict[str, list[_Standby]] = {}
        self.failures = 0
        self.cold = False
        self.warm_taken = 0

    def __call__(self, hosts: dict[str, int]) -> dict[str, int]:
        """The hosts (with slots) to advertise, out of the wanted `hosts`."""
        with self._lock:
            for host in [h for h in self._standby if h not in hosts]:  # node gone or not wanted
                for sb in self._standby.pop(host):
                    self._kill(sb.actor)
            out: dict[str, int] = {}
            for host, want in hosts.items():
                standbys = self._standby.setdefault(host, [])
                have = self.advertised.get(host, 0)
                for sb in [sb for sb in standbys if sb.offered][:max(0, have - want)]:
                    sb.offered = False  # the job shrank before the driver took these
                have = min(have, want)
                have = want if self.cold else have + self._admit(host, standbys, want - have)
                if have > 0:
                    out[host] = have
            self.advertised = out
            return dict(out)

    def _admit(self, host: str, standbys: list[_Standby], need: int) -> int:
        """Offers up to `need` more slots of `host` from its standbys; starts actors for the rest."""
        for sb in [sb for sb in standbys if not sb.ready]:
            try:
                sb.ready = self._done(sb.ref)
            except Exception as exc:  # noqa: BLE001 - a failed warm-up or a dead actor: replace it
                standbys.remove(sb)
                self._kill(sb.actor)
                self.failures += 1
                log.warning("a worker's warm-up failed on node %s (%d of %d allowed): %s", host[:12],
                            self.failures, self.max_failures, exc)
                if self.failures >= self.max_failures:
                    log.warning("joins are cold from now on: slots are offered before their worker is warm")
                    self.cold = True
                    return need
        admitted = 0
        for sb in standbys:
            if admitted < need and not sb.offered and (sb.ready or self._clock() - sb.started > self.cold_after_s):
                sb.offered = True
                admitted += 1
        spare = sum(1 for sb in standbys if not sb.offered)
        for _ in range(need - admitted - spare):  # one warming actor per slot still to come
            actor, ref = self._start(host)
            standbys.append(_Standby(actor, ref, self._clock()))
        return admitted

    def take(self, host: str) -> Any | None:
        """A warm (or warming) actor of `host` for the driver's new worker; None: start a cold one."""
        with self._lock:
            standbys = self._standby.get(host, [])
            if not standbys:
                return None
            # Offered ones first (their slot is the one being filled), ready before warming.
            sb = min(standbys, key=lambda sb: (not sb.offered, not sb.ready))
            standbys.remove(sb)
            self.warm_taken += sb.ready
            return sb.actor

    def close(self) -> None:
        with self._lock:
            for standbys in self._standby.values():
                for sb in standbys:
                    self._kill(sb.actor)
            self._standby.clear()
            self.advertised = {}


def _shut_down_horovod() -> None:
    """End this worker's Horovod after its function returned: a coordinated shutdown of the
    background loops, before the executor kills the actors (a killed peer's closed connections
    made the other workers log `Horovod background loop uncaught exception: ... Connection
    reset by peer` after every successful job). The function's last collective is behind every
    worker by then, and a rank still finishing up (rank 0 writing the summary) needs no more."""
    hvd = sys.modules.get("horovod.torch")
    try:
        if hvd is not None and hvd.is_initialized():
            hvd.shutdown()
    except Exception as exc:  # noqa: BLE001 - the job is done: a failed shutdown must not fail it
        log.debug("horovod shutdown: %s", exc)


def _final_rank(start_rank: int) -> int:
    """This worker's rank at the end (ranks change across resets), else its starting rank."""
    import sys
    hvd = sys.modules.get("horovod.torch")
    try:
        if hvd is not None and hvd.is_initialized():
            return int(hvd.rank())
    except Exception:  # noqa: BLE001 - a shut-down Horovod raises ValueError; any failure: fall back
        pass
    return start_rank


def _local_network(node_ips: Iterable[str], driver_ip: str) -> tuple[str, str]:
    """(network interface, driver address) for Horovod's traffic. All nodes on this machine:
    loopback (the elastic driver hangs on a single machine without an interface, see notes).
    Otherwise the interface holding the driver's node IP, which must route to every node."""
    if set(node_ips) <= {driver_ip}:
        return "lo", "127.0.0.1"
    import psutil
    import socket
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == driver_ip for a in addrs):
            return name, driver_ip
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
        env [None]: extra environment variables for every worker.
        nic [None]: network interface for Horovod's traffic; None: "lo" when every node is this
            machine, else the interface holding the driver's node IP.
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
            log.info("connecting to Ray at %s", address)
            if not sys.stdout.isatty():  # the workers' lines without colour codes in a log file or pipe
                os.environ.setdefault("RAY_COLOR_PREFIX", "0")
            ray.init(address=address, **kwargs)
            self._owns_ray = True
        if self.nic is not None:
            self._network = (self.nic, ray.util.get_node_ip_address())
        else:
            ips = [n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")]
            self._network = _local_network(ips, ray.util.get_node_ip_address())
        self.discovery = RayClusterDiscovery(
            min_workers=self.min_workers, max_workers=self.max_workers, cpus_per_worker=self.cpus_per_worker,
            gpus_per_worker=self.gpus_per_worker, run_dir=self.run_dir)
        log.info("Ray executor ready: %d..%d workers of %s, Horovod over %s", self.min_workers,
                 self.max_workers, self.discovery.bundle(), self._network[0])

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


def warm_train_worker(train_args: Sequence[str]) -> None:
    """The warm-up of `hvd-abs launch ray`'s workers: what a horovodrun standby does first."""
    from hvd_abs.launch.standby import get_warm

    get_warm(list(train_args))


def train_worker(train_args: Sequence[str]) -> Any:
    """The worker function of `hvd-abs launch ray`: `hvd-abs train TRAIN_ARGS` in this actor. A
    refused input (its one line said, exit 2) is raised as ScriptRefused, for the launcher."""
    from hvd_abs.elastic.worker import command

    try:
        return command.main(args=list(train_args), standalone_mode=False)
    except SystemExit as exc:
        refusal = _refusal(exc)
        if refusal is not None:
            raise refusal from None
        raise


def warm_script_worker() -> None:
    """The warm-up of `launch ray --script` workers: the imports (the data is the script's)."""
    from hvd_abs.launch.standby import get_warm

    get_warm(None)


def script_worker(script: str, cwd: str, argv: Sequence[str]) -> None:
    """The worker function of `launch ray --script`: run SCRIPT as __main__ in this actor with
    ARGV, from `cwd` when this node has it (the launcher's directory: the script's relative paths
    then mean what they meant there). A non-zero exit is this worker's failure."""
    from hvd_abs.launch.standby import run_as_main

    saved_cwd = os.getcwd()
    try:
        if os.path.isdir(cwd):
            os.chdir(cwd)
        run_as_main(script, list(argv))
    except SystemExit as exc:
        refusal = _refusal(exc)
        if refusal is not None:
            raise refusal from None
        if exc.code not in (None, 0):
            raise RuntimeError(f"{script} exited with {exc.code}") from None
    finally:
        os.chdir(saved_cwd)
