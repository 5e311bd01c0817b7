"""The launcher's end of the job channel (hvd_abs/elastic/job_channel.py): a small TCP service
that takes authenticated requests from the job's workers on any host and carries them out on
this host, so nothing needs storage the hosts share. Requests now: `world_size` (what rank 0
wants; written where discovery reads it)."""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import socket
import socketserver
import struct
import sys
import threading
from pathlib import Path
from typing import Any, Callable

from hvd_abs.elastic.job_channel import (ADDRESS_ENV, GREETING, KEY_ENV, MAX_HEADER, MAX_PAYLOAD, NONCE_BYTES, mac,
                                         new_key, recv_exact)
from hvd_abs.elastic.world_signal import write_wanted

Handler = Callable[[dict[str, Any], bytes], dict[str, Any]]
PEER_TIMEOUT_S = 120.0  # a peer that stalls mid-request holds one thread this long at most


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class JobService:
    """Serve the job's requests on `bind` (an address of this host the workers can reach) until
    stopped. env() is what each worker needs to reach it."""

    def __init__(self, run_dir: str | os.PathLike, bind: str = "127.0.0.1") -> None:
        self.run_dir = Path(run_dir)
        self.key = new_key()
        self.refused = 0  # requests without the key (for tests and the launcher's log)
        self.handlers: dict[str, Handler] = {"world_size": self._world_size}
        self._lock = threading.Lock()  # requests act one at a time: their order is the job's
        service = self

        class Request(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                service._serve(self.request)

        self._server = _Server((bind, 0), Request)
        self.address = f"{bind}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True, name="hvd_abs-job-service")

    def env(self) -> dict[str, str]:
        return {ADDRESS_ENV: self.address, KEY_ENV: self.key}

    def __enter__(self) -> "JobService":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _serve(self, sock: socket.socket) -> None:
        sock.settimeout(PEER_TIMEOUT_S)
        nonce = secrets.token_bytes(NONCE_BYTES)
        try:
            sock.sendall(GREETING + nonce.hex().encode() + b"\n")
            (length,) = struct.unpack(">I", recv_exact(sock, 4))
            if length > MAX_HEADER:
                return self._refuse(sock, "header too long")
            header_bytes = recv_exact(sock, length)
            if not hmac.compare_digest(recv_exact(sock, 32), mac(bytes.fromhex(self.key), nonce, header_bytes)):
                return self._refuse(sock, "not authenticated: this job's key is missing or wrong")
            header = json.loads(header_bytes)
            size = int(header.get("size", 0))
            if not 0 <= size <= MAX_PAYLOAD:
                return self._answer(sock, {"ok": False, "error": f"payload size {size} out of range"})
            payload = recv_exact(sock, size)
            if hashlib.sha256(payload).hexdigest() != header.get("sha256"):
                return self._answer(sock, {"ok": False, "error": "payload does not match its hash"})
            handler = self.handlers.get(header.get("op"))
            if handler is None:
                return self._answer(sock, {"ok": False, "error": f"unknown request {header.get('op')!r}"})
            with self._lock:
                try:
                    answer = {"ok": True, **handler(header, payload)}
                except (ValueError, OSError) as exc:
                    answer = {"ok": False, "error": str(exc)}
            self._answer(sock, answer)
        except (OSError, ValueError, ConnectionError):
            return  # a peer that went away or spoke nonsense: nothing was done for it

    def _refuse(self, sock: socket.socket, why: str) -> None:
        self.refused += 1
        print(f"hvd-abs job service: refused a request from {sock.getpeername()[0]}: {why}", file=sys.stderr)
        self._answer(sock, {"ok": False, "error": why})

    @staticmethod
    def _answer(sock: socket.socket, answer: dict[str, Any]) -> None:
        try:
            sock.sendall(json.dumps(answer).encode() + b"\n")
        except OSError:
            pass

    def _world_size(self, header: dict[str, Any], payload: bytes) -> dict[str, Any]:
        write_wanted(self.run_dir, header.get("world_size"), reason=str(header.get("reason", "")))
        return {}
