"""The world-size signal: the job publishes how many workers it wants, discovery reads it.

A JSON file in the launcher's run directory (`<run>/elastic/world_size.json`), replaced
atomically so a reader never sees half a file, and readable by its owner only. Rank 0 may run
on another host: it then sends the request through the job channel (job_channel.py) and the
launcher writes the file. Standard library only.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

from hvd_abs.atomic import write_text_atomic

MAX_WORLD_SIZE = 65536


class SignalError(ValueError):
    """The signal file exists but does not hold a valid request."""


def signal_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "elastic" / "world_size.json"


def write_wanted(run_dir: str | os.PathLike, world_size: int, reason: str = "") -> Path:
    """Publish `world_size` as the number of workers the job wants (atomic replace, mode 0600)."""
    if not isinstance(world_size, int) or not 1 <= world_size <= MAX_WORLD_SIZE:
        raise SignalError(f"world size must be an integer in [1, {MAX_WORLD_SIZE}], got {world_size!r}")
    path = signal_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = json.dumps({"world_size": world_size, "reason": reason, "time": time.time(), "pid": os.getpid()})
    return write_text_atomic(path, body, mode=0o600)


def publish_wanted(run_dir: str | os.PathLike, world_size: int, reason: str = "",
                   env: dict[str, str] | None = None) -> None:
    """Rank 0's request: through the launcher's job channel when it set one up, else the file.
    A launcher out of reach is a warning, not the job's end: the request is advisory, and the
    next one (at the next entry or growth) tries again."""
    from hvd_abs.elastic.job_channel import ChannelError, JobChannel

    channel = JobChannel.from_env(env)
    if channel is None:
        write_wanted(run_dir, world_size, reason)
        return
    try:
        channel.request("world_size", world_size=world_size, reason=reason)
    except ChannelError as exc:
        print(f"hvd_abs: the world-size request ({world_size}) did not reach the launcher: {exc}", file=sys.stderr)


def read_wanted(run_dir: str | os.PathLike) -> int | None:
    """The published world size; None when nothing was published yet. Raises SignalError on a
    file that is not a JSON object with an integer `world_size` in [1, MAX_WORLD_SIZE]."""
    path = signal_path(run_dir)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SignalError(f"{path}: not JSON ({exc})") from None
    n = data.get("world_size") if isinstance(data, dict) else None
    if type(n) is not int or not 1 <= n <= MAX_WORLD_SIZE:
        raise SignalError(f"{path}: 'world_size' must be an integer in [1, {MAX_WORLD_SIZE}], got {n!r}")
    return n


def start_job(run_dir: str | os.PathLike, min_np: int) -> None:
    """Before a launcher starts a job in `run_dir`: forget what an earlier job there published
    (its world size, discovery's warm-mode memory, its standbys) and ask for `min_np` workers,
    so discovery never starts the new job at the old job's size. Rank 0 publishes the job's own
    wanted size as soon as it runs."""
    elastic = signal_path(run_dir).parent
    (elastic / "advertised.json").unlink(missing_ok=True)
    shutil.rmtree(elastic / "standby", ignore_errors=True)
    write_wanted(run_dir, min_np, reason="job start")
