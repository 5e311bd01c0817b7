"""Warm joins for Horovod on Ray (hvd_abs.launch.ray_executor): WarmPool offers a new slot to
Horovod's driver only once an actor on its node has warmed up."""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

# The logger of ray_executor, which this was split out of: the lines (and any filter on them)
# name the same logger as before.
log = logging.getLogger("hvd_abs.launch.ray_executor")

# How long a joining worker may warm up before its slot is offered anyway (--warm-timeout).
WARM_TIMEOUT_S = 60.0


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
