"""`hvd-abs launch ray --address`: its check (auto, local or HOST:PORT), a probe of the Ray
head before Ray is asked to join it, and the one line for a cluster that wants a token."""
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


def _chain(exc: BaseException) -> str:
    """The text of an exception and of everything it was raised from."""
    texts, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        texts.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    return "\n".join(texts)


def auth_problem(exc: BaseException, address: str) -> str | None:
    """The one line for a failed ray.init that was about token authentication (Ray 2.60 turns it
    on where a token exists, and a driver needs RAY_AUTH_MODE=token to send one), else None.
    Ray itself answers with "Failed to connect" after 20 s of retries and a page of advice."""
    import os

    text = _chain(exc)
    if "InvalidAuthToken" not in text and "AuthenticationError" not in text:
        return None
    where = os.environ.get("RAY_AUTH_TOKEN_PATH") or "~/.ray/auth_token"
    token_mode = os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
    if not token_mode:
        return (f"the Ray cluster at {address} requires token authentication (InvalidAuthToken): set "
                f"RAY_AUTH_MODE=token, with the cluster's token in {where}, in a file named by RAY_AUTH_TOKEN_PATH "
                f"or in RAY_AUTH_TOKEN")
    if "InvalidAuthToken" in text:
        return (f"the Ray cluster at {address} refused this machine's token (InvalidAuthToken): give it the token "
                f"of the cluster's head (the head's ~/.ray/auth_token) in {where}, a file named by "
                f"RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN")
    return (f"RAY_AUTH_MODE=token but no token here: put the Ray cluster's token in {where}, in a file named by "
            f"RAY_AUTH_TOKEN_PATH or in RAY_AUTH_TOKEN")
