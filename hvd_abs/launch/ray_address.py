"""`hvd-abs launch ray --address`: its check (auto, local or HOST:PORT) and a probe of the Ray
head before Ray is asked to join it."""
from __future__ import annotations

import re

import click

_RAY_ADDRESS = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]):(\d{1,5})$")


def ray_address(address: str) -> str:
    """Check --address: 'auto', 'local' or HOST:PORT. Raises click.UsageError naming the fix."""
    if address in ("auto", "local"):
        return address
    if address.startswith("ray://"):
        raise click.UsageError("--address ray://... (Ray Client) cannot work: Ray workers must reach this "
                               "process's Horovod rendezvous; run `hvd-abs launch ray` on a cluster node "
                               "with --address auto or HOST:PORT of the head (GCS) instead")
    m = _RAY_ADDRESS.match(address)
    if m is None or not 1 <= int(m.group(1)) <= 65535:
        raise click.UsageError(f"--address must be auto, local or HOST:PORT of the Ray head (e.g. "
                               f"10.0.0.1:6379), got {address!r}")
    return address


def probe_ray_head(address: str, timeout_s: float = 5.0) -> None:
    """For HOST:PORT, check that something listens there before Ray is asked to join it: Ray
    itself retries an unanswered address for minutes. Raises click.UsageError naming the fix."""
    import socket

    if address in ("auto", "local"):
        return
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise click.UsageError(f"no Ray head answers at --address {address} ({why}): start one there with "
                               f"`ray start --head --port {port}`, or pass --address local") from None
