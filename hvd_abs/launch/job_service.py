"""The launcher's end of the job channel (hvd_abs/elastic/job_channel.py): a small TCP service
that takes authenticated requests from the job's workers on any host and carries them out on
this host, so nothing needs storage the hosts share. Requests: `world_size` (what rank 0 wants;
written where discovery reads it); the run's outputs (elastic/outputs_relay.py: prepare,
metrics, summary, checkpoint, weights, finish), carried out with a training.outputs.LocalOutputs
whose metrics writer lives as long as the job, so a line sent again by a later rank 0 is
written once; resume_checkpoint (the newest good checkpoint of the job's --resume folder)."""
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
from hvd_abs.loggers import LOGGERS
from hvd_abs.metrics import MetricsWriter
from hvd_abs.training.checkpoint import load_latest, verified_payload
from hvd_abs.training.outputs import LocalOutputs
from hvd_abs.training.progress import format_summary
from hvd_abs.training.run_dir import CHECKPOINT_DIR

Handler = Callable[[dict[str, Any], bytes], dict[str, Any]]
PEER_TIMEOUT_S = 120.0  # a peer that stalls mid-request holds one thread this long at most


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class JobService:
    """Serve the job's requests on `bind` (an address of this host the workers can reach) until
    stopped. env() is what each worker needs to reach it."""

    def __init__(self, run_dir: str | os.PathLike, bind: str = "127.0.0.1", resume: str | None = None,
                 in_place: bool = False) -> None:
        self.run_dir = Path(run_dir).expanduser()
        self.resume = Path(resume).expanduser().resolve() if resume else None  # the one folder it reads from
        self.in_place = in_place  # the run continues in its folder (--resume OUT): model.pt goes until it ends
        self.key = new_key()
        self.refused = 0  # requests without the key (for tests and the launcher's log)
        self.outputs = LocalOutputs(self.run_dir)
        self._writer: MetricsWriter | None = None
        self._weights: str | None = None
        self.handlers: dict[str, Handler] = {
            "world_size": self._world_size, "prepare": self._prepare, "metrics": self._metrics,
            "summary": self._summary, "checkpoint": self._checkpoint, "weights": self._save_weights,
            "finish": self._finish, "resume_checkpoint": self._resume_checkpoint}
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
        self.close()

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
                except Exception as exc:  # noqa: BLE001 - whatever failed, the worker hears why, the service goes on
                    answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            body = answer.pop("payload", b"")
            if body:
                answer.update(size=len(body), sha256=hashlib.sha256(body).hexdigest())
            self._answer(sock, answer, body)
        except (OSError, ValueError, ConnectionError):
            return  # a peer that went away or spoke nonsense: nothing was done for it

    def _refuse(self, sock: socket.socket, why: str) -> None:
        self.refused += 1
        print(f"hvd-abs job service: refused a request from {sock.getpeername()[0]}: {why}", file=sys.stderr)
        self._answer(sock, {"ok": False, "error": why})

    @staticmethod
    def _answer(sock: socket.socket, answer: dict[str, Any], body: bytes = b"") -> None:
        try:
            sock.sendall(json.dumps(answer).encode() + b"\n")
            if body:
                sock.sendall(body)
        except OSError:
            pass

    def _world_size(self, header: dict[str, Any], payload: bytes) -> dict[str, Any]:
        write_wanted(self.run_dir, header.get("world_size"), reason=str(header.get("reason", "")))
        return {}

    # --- the run's outputs, as LocalOutputs writes them -----------------------------------------
    def writer(self) -> MetricsWriter:
        if self._writer is None:
            self._writer = self.outputs.writer(0, self.in_place)
        return self._writer

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()

    def _prepare(self, header: dict[str, Any], payload: bytes) -> dict[str, Any]:
        if self._writer is None:  # once per job: a later rank 0 must not clear what this job wrote
            at = header.get("resumed_at")
            loggers = header.get("loggers") or []
            if not all(name in LOGGERS for name in loggers):
                raise ValueError(f"unknown loggers {loggers!r}")
            self.outputs.loggers = tuple(loggers)
            self.outputs.prepare(bool(header.get("overwrite")), (int(at[0]), int(at[1])) if at else None,
                                 payload.decode("utf-8") if header.get("config") else None)
            self.writer()
        return {}

    def _metrics(self, header: dict[str, Any], payload: bytes) -> dict[str, Any]:
        record = _json_object(payload)
        if "event" in record:
            self.writer().event(str(record.pop("event")), **record)
        else:
            self.writer().epoch(**record)
        return {}

    def _summary(self, header: dict[str, Any], payload: bytes) -> dict[str, Any]:
        self.writer().summary(**_json_object(payload))
        return {}

    def _checkpoint(self, header: dict[str, Any], payload: bytes) -> dict[str, Any]:
        return {"path": self.outputs.save_checkpoint_payload(payload, header.get("updates"),
                                                             int(header.get("keep", 3)))}

    def _save_weights(self, header: dict[str, Any], payload: bytes) -> dict[str, Any]:
        self._weights = self.outputs.save_weights(payload)
        return {}

    def _finish(self, header: dict[str, Any], payload: bytes) -> dict[str, Any]:
        sent = _json_object(payload)
        done = self.outputs.complete({**sent, **({"weights": self._weights} if self._weights else {})},
                                     bool(header.get("plot")), self.writer())
        if "plot" in done:  # the table a local run prints, from the files here (rank 0 may have none)
            print(format_summary(done), flush=True)
        return {"added": {k: v for k, v in done.items() if k not in sent}}

    def _resume_checkpoint(self, header: dict[str, Any], payload: bytes) -> dict[str, Any]:
        asked = Path(str(header.get("run_dir"))).expanduser().resolve()
        if self.resume is None or asked != self.resume:
            raise ValueError(f"{asked} is not this job's --resume folder")
        found = load_latest(self.resume / CHECKPOINT_DIR)  # (a damaged newest is skipped, with a warning)
        if found is None:
            raise ValueError(f"--resume {self.resume}: no checkpoint there verifies")
        return {"name": found[0].name, "payload": verified_payload(found[0])}


def _json_object(payload: bytes) -> dict[str, Any]:
    record = json.loads(payload)
    if not isinstance(record, dict):
        raise ValueError("expected a JSON object")
    return record
