"""The channel from a job's workers to its launcher, on whatever host each runs: one
authenticated request per TCP connection (the world size rank 0 wants; the run's outputs:
outputs_relay.py).

The launcher makes a per-job key and hands it, with its address, to every worker in the
environment (horovodrun forwards the launcher's environment to remote workers). Each request
proves the key on a fresh challenge: the launcher sends a nonce, the worker answers with
HMAC-SHA256(key, nonce + header) before any payload is read, so a peer without the key is
refused at its first bytes and a recorded request cannot be replayed. Standard library only.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
import struct
import time
from typing import Any

ADDRESS_ENV = "HVD_ABS_JOB_SERVICE"  # HOST:PORT of the launcher's job service
KEY_ENV = "HVD_ABS_JOB_KEY"  # the job's key, hex
GREETING = b"HVDABS-JOB/1 "
NONCE_BYTES = 32
MAX_HEADER = 64 * 1024
MAX_PAYLOAD = 1 << 34  # 16 GiB: the largest checkpoint a request may carry
MAX_ANSWER = 16 << 20  # an answer's JSON line (a summary's additions)


class ChannelError(RuntimeError):
    """The launcher could not be reached in time, or refused the request (its reason)."""


def new_key() -> str:
    return os.urandom(32).hex()


def mac(key: bytes, nonce: bytes, header: bytes) -> bytes:
    return hmac.new(key, nonce + header, hashlib.sha256).digest()


def recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError(f"peer closed with {left} of {n} bytes unread")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def recv_line(sock: socket.socket, limit: int = 4096) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError("peer closed mid-line")
        data += chunk
        if len(data) > limit:
            raise ConnectionError("line too long")
    return data[:-1]


class JobChannel:
    """A worker's handle on its launcher's job service."""

    def __init__(self, address: str, key: str, timeout_s: float = 60.0) -> None:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ChannelError(f"{ADDRESS_ENV}={address!r} is not HOST:PORT")
        try:
            self.key = bytes.fromhex(key)
        except ValueError:
            raise ChannelError(f"{KEY_ENV} is not a hex key") from None
        self.address, self.host, self.port, self.timeout_s = address, host, int(port), timeout_s

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "JobChannel | None":
        """The channel the launcher set up for this worker; None when there is none (a plain
        `hvd-abs train`, or a launcher that shares the run directory with its workers)."""
        env = os.environ if env is None else env
        if not env.get(ADDRESS_ENV):
            return None
        if not env.get(KEY_ENV):
            raise ChannelError(f"{ADDRESS_ENV} is set but {KEY_ENV} is not: the launcher passes both")
        return cls(env[ADDRESS_ENV], env[KEY_ENV])

    def request(self, op: str, payload: bytes = b"", **fields: Any) -> dict[str, Any]:
        """Send one request and return the launcher's answer. Connection failures are retried
        until timeout_s (the launcher may be busy for a moment); a refusal is not."""
        deadline = time.monotonic() + self.timeout_s
        header = json.dumps({"op": op, "size": len(payload), "sha256": hashlib.sha256(payload).hexdigest(),
                             **fields}).encode()
        if len(header) > MAX_HEADER:
            raise ChannelError(f"request header of {len(header)} bytes is over {MAX_HEADER}")
        delay = 0.05
        while True:
            try:
                return self._once(header, payload, max(1.0, deadline - time.monotonic()))
            except (ConnectionError, socket.timeout, OSError) as exc:
                if time.monotonic() + delay > deadline:
                    raise ChannelError(f"the launcher's job service at {self.address} did not answer "
                                       f"within {self.timeout_s:g} s ({exc})") from None
                time.sleep(delay)
                delay = min(1.0, delay * 2)

    def _once(self, header: bytes, payload: bytes, timeout_s: float) -> dict[str, Any]:
        with socket.create_connection((self.host, self.port), timeout=timeout_s) as sock, sock.makefile("rb") as rfile:
            greeting = rfile.readline(4096)
            if not greeting.startswith(GREETING) or not greeting.endswith(b"\n"):
                raise ChannelError(f"{self.address} is not an hvd_abs job service")
            nonce = bytes.fromhex(greeting[len(GREETING):-1].decode())
            sock.sendall(struct.pack(">I", len(header)) + header + mac(self.key, nonce, header))
            sock.sendall(payload)
            line = rfile.readline(MAX_ANSWER)
            if not line.endswith(b"\n"):
                raise ConnectionError("the launcher's answer was cut off")
            answer = json.loads(line)
            size = int(answer.get("size") or 0)
            if size:  # an answer with a payload (a checkpoint): checked against its hash
                body = rfile.read(size)
                if len(body) != size or hashlib.sha256(body).hexdigest() != answer.get("sha256"):
                    raise ConnectionError("the launcher's answer payload was cut off or damaged")
                answer["payload"] = body
        if not answer.get("ok"):
            raise ChannelError(f"the launcher refused {json.loads(header)['op']!r}: {answer.get('error')}")
        return answer
