"""Host discovery for `horovodrun --host-discovery-script`: the host pool meets the wanted size.

horovodrun polls the script every second and starts or stops workers to match the slots it
prints. The script prints `host:slots` lines covering min(wanted, max_np, pool) slots, with
wanted read from the job's world-size signal, so workers join exactly when the batch grows.
Standard library only: it runs in a fresh interpreter on every poll.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

from hvd_abs.atomic import write_text_atomic
from hvd_abs.elastic.world_signal import SignalError, read_wanted

_HOST = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,252})$")


class HostfileError(ValueError):
    """A hostfile line that is not `host`, `host:N` or `host slots=N`."""


def parse_hostfile(text: str, source: str = "hostfile") -> list[tuple[str, int]]:
    """Parse a hostfile into [(host, slots)], in order. Accepts Horovod's `host slots=N`, the
    `host:N` form and a bare `host` (1 slot); `#` starts a comment. Raises HostfileError naming
    the line to fix."""
    pool: list[tuple[str, int]] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = (re.fullmatch(r"(\S+)\s+slots\s*=\s*(\d+)", line) or re.fullmatch(r"([^\s:]+):(\d+)", line)
             or re.fullmatch(r"([^\s:]+)()", line))
        if m is None or not _HOST.match(m.group(1)):
            raise HostfileError(f"{source} line {number}: {raw.strip()!r} is not 'HOST slots=N', 'HOST:N' or 'HOST'")
        slots = int(m.group(2)) if m.group(2) else 1
        if slots < 1:
            raise HostfileError(f"{source} line {number}: slots must be at least 1, got {slots}")
        pool.append((m.group(1), slots))
    if not pool:
        raise HostfileError(f"{source}: no hosts; write one 'HOST slots=N' line per host")
    return pool


def local_pool(slots: int) -> list[tuple[str, int]]:
    """This machine under two names: rank 0's slot as `localhost`, the others as `127.0.0.1`.
    Horovod bars the *host* of a failed worker and stops the job once every host with workers
    is barred: with a single name, one failure on one machine would end the job."""
    return [("localhost", 1)] + ([("127.0.0.1", slots - 1)] if slots > 1 else [])


def select_hosts(pool: list[tuple[str, int]], wanted: int) -> list[tuple[str, int]]:
    """The first `wanted` slots of the pool, host by host: [(host, slots)]."""
    chosen, left = [], wanted
    for host, slots in pool:
        if left <= 0:
            break
        take = min(slots, left)
        chosen.append((host, take))
        left -= take
    return chosen


# How long warm growth waits for ready standbys before adding the slots cold (--warm-timeout).
WARM_TIMEOUT_S = 30.0


def discover(run_dir: str, pool: list[tuple[str, int]], min_np: int, max_np: int, warm: bool = False,
             cold_after_s: float = WARM_TIMEOUT_S) -> tuple[list[tuple[str, int]], str]:
    """Hosts to advertise and a note for stderr. Before the job publishes anything, and when the
    signal is malformed, min_np slots are advertised: never more workers than asked for.

    warm: grow only into slots that a ready standby (standby.py) will fill, so the join does not
    stall the survivors on a cold start; after `cold_after_s` seconds without enough standbys,
    grow anyway (cold) rather than never."""
    note = ""
    try:
        wanted = read_wanted(run_dir)
    except SignalError as exc:
        wanted, note = None, f"ignoring a malformed world-size signal: {exc}"
    target = max(min_np, min(max_np, wanted if wanted is not None else min_np))
    if warm:
        target = _warm_cap(Path(run_dir), pool, target, cold_after_s)
    return select_hosts(pool, target), note


def _warm_cap(run_dir: Path, pool: list[tuple[str, int]], target: int, cold_after_s: float) -> int:
    """The slots to advertise in warm mode, remembering the last answer in the run dir.

    Growing, the new slots are taken in pool order while the machine of each has a ready
    standby (the launcher's standby pool counts them in ready.json) not already promised to a
    slot advertised earlier whose claim has not come yet."""
    state_path = run_dir / "elastic" / "advertised.json"
    try:
        state = json.loads(state_path.read_text())
        last, since = int(state["advertised"]), float(state["waiting_since"])
        promised = {str(m): int(n) for m, n in state.get("promised", {}).items()}
        promised_at = float(state.get("promised_at", 0.0))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        last, since, promised, promised_at = None, 0.0, {}, 0.0  # the first poll: the initial workers start cold
    now = time.time()
    if now - promised_at > cold_after_s:
        promised = {}  # a promised standby that died unclaimed must not hold a slot back for ever
    if last is None or target <= last:
        advertised, since = target, 0.0  # first poll, steady or shrinking: as asked
    else:
        since = since or now  # growth asked: add only the slots ready standbys will fill
        ready, claimed, machine_of = _standbys(run_dir)
        free = {m: n - max(0, promised.get(m, 0) - claimed.get(m, 0)) for m, n in ready.items()}
        taken: dict[str, int] = {}
        for host in [h for h, n in pool for _ in range(n)][last:target]:
            m = machine_of.get(host, host)
            if free.get(m, 0) - taken.get(m, 0) <= 0:
                break
            taken[m] = taken.get(m, 0) + 1
        warm = sum(taken.values())
        if last + warm >= target or now - since >= cold_after_s:
            advertised, since = target, 0.0
        else:
            advertised = last + warm
        for m, n in taken.items():
            promised[m], promised_at = max(promised.get(m, 0), claimed.get(m, 0)) + n, now
    state_path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(state_path, json.dumps({"advertised": advertised, "waiting_since": since,
                                              "promised": promised, "promised_at": promised_at}))
    return advertised


def _standbys(run_dir: Path) -> tuple[dict[str, int], dict[str, int], dict[str, str]]:
    """ready.json of the launcher's standby pool: ready and claimed standbys by machine, and
    each pool host's machine (empty when there is none or it is unreadable)."""
    try:
        state = json.loads((run_dir / "elastic" / "standby" / "ready.json").read_text())
        return ({str(m): int(n) for m, n in state["ready"].items()},
                {str(m): int(n) for m, n in state["claimed"].items()},
                {str(h): str(m) for h, m in state["machine"].items()})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}, {}, {}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", required=True, help="the job's --out directory (holds the signal)")
    p.add_argument("--hostfile", help="host pool, 'HOST slots=N' per line (default: this machine with --slots, "
                                      "as localhost:1 + 127.0.0.1:rest, see local_pool)")
    p.add_argument("--slots", type=int, default=None, help="slots on localhost when no hostfile is given (default: max-np)")
    p.add_argument("--min-np", type=int, default=1)
    p.add_argument("--max-np", type=int, required=True)
    p.add_argument("--warm", action="store_true", help="grow only into slots a ready standby will fill")
    p.add_argument("--warm-timeout", type=float, default=WARM_TIMEOUT_S,
                   help="with --warm: seconds to wait for standbys before growing cold anyway")
    args = p.parse_args(argv)
    if args.min_np < 1 or args.max_np < args.min_np or (args.slots is not None and args.slots < 1):
        print(f"discover_hosts: need 1 <= --min-np <= --max-np and --slots >= 1, got --min-np {args.min_np} "
              f"--max-np {args.max_np} --slots {args.slots}", file=sys.stderr)
        return 2
    if not args.warm_timeout >= 0:
        print(f"discover_hosts: --warm-timeout must be >= 0 seconds, got {args.warm_timeout}", file=sys.stderr)
        return 2
    try:
        if args.hostfile:
            pool = parse_hostfile(Path(args.hostfile).read_text(), args.hostfile)
        else:
            pool = local_pool(args.slots or args.max_np)
    except (OSError, HostfileError) as exc:
        print(f"discover_hosts: {exc}", file=sys.stderr)
        return 2
    hosts, note = discover(args.run_dir, pool, args.min_np, args.max_np, warm=args.warm,
                           cold_after_s=args.warm_timeout)
    if note:
        print(f"discover_hosts: {note}", file=sys.stderr)
    for host, slots in hosts:
        print(f"{host}:{slots}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
