"""Integrity and security (issue 7): damaged checkpoints end to end, no unpickling beyond
`torch.load(weights_only=True)`, and every control channel of ours on loopback or owner-only.

Audit (what listens, and who may talk to it):
- world-size signal: a file, `<run>/elastic/world_size.json`, mode 0600, validated on read
  (test_elastic_units.py); discovery prints validated `host:slots` lines only (test_bad_input.py).
- warm standbys: Unix sockets in the run dir created under umask 077 (mode 0600): checked here.
- Ray executor: Horovod's Gloo rendezvous (an HTTP key-value store with no authentication) is
  started by our code; it listens on the address workers are given (127.0.0.1 on one machine),
  not on every interface as Horovod's own does: checked here.
- Not ours, reported: horovodrun's own rendezvous HTTP server binds all interfaces without
  authentication; its driver/task/notification services bind all interfaces but sign every
  (cloudpickled) message with the job's HMAC secret; Gloo's data plane listens on the
  `--network-interface` (lo on one machine); Ray 2.60 clusters need a token by default.
"""
from __future__ import annotations

import ast
import json
import os
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path

import torch

from conftest import BIN, REPO
from hvd_abs.training import checkpoint as ck
from hvd_abs.metrics import read_metrics

TRAIN = ["train", "--dataset", "digits", "--model", "mlp", "--method", "absa", "--base-batch", "64", "--epochs", "4",
         "--eig-samples", "128", "--duration", "1", "--max-batch", "256", "--threads", "1", "--quiet",
         "--checkpoint-every", "1"]


def hvd_abs(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "hvd-abs"), *args], capture_output=True, text=True, timeout=300, cwd=REPO,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_resume_skips_a_tampered_newest_checkpoint_and_finishes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = hvd_abs(*TRAIN, "--out", str(out))
    assert first.returncode == 0, first.stderr
    ckpts = ck.list_checkpoints(out / "checkpoints")
    # Plain PyTorch opens the newest (no hvd_abs header), and its weights are the run's last ones.
    import torch
    plain = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    final = torch.load(out / "model.pt", weights_only=True)
    assert plain["model"].keys() == final.keys() and all(torch.equal(plain["model"][k], v) for k, v in final.items())
    assert [p.name for p in ckpts][-1] == f"ckpt-{read_metrics(out)[0][-1]['updates']:06d}.pt"
    newest, previous = ckpts[-1], ckpts[-2]
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit in the payload: the checksum catches it
    newest.write_bytes(bytes(data))
    epochs_before = read_metrics(out)[0]

    resumed = hvd_abs(*TRAIN, "--resume", str(out))
    assert resumed.returncode == 0, resumed.stderr
    assert f"skipping damaged checkpoint: {newest}: checksum mismatch" in resumed.stderr
    assert "Traceback" not in resumed.stderr
    # It went back to the previous checkpoint, redid the last epoch, and wrote a good newest one.
    assert Path(json.loads((out / "summary.json").read_text())["resumed_from"]).name == previous.name
    assert ck.load_checkpoint(newest)["updates"] == epochs_before[-1]["updates"]
    epochs_after = read_metrics(out)[0]
    assert [e["epoch"] for e in epochs_after] == [1, 2, 3, 4]  # the redone epoch's line is not repeated
    # (It replaced the first attempt's line: the same values but for its own timings.)
    timing = ("epoch_s", "samples_per_s", "second_order_s")
    untimed = lambda eps: [{k: v for k, v in e.items() if k not in timing} for e in eps]  # noqa: E731
    assert untimed(epochs_after) == untimed(epochs_before) and epochs_after[:3] == epochs_before[:3]


class _Touch:
    """Unpickling this would create a file: stands for any code a crafted pickle could run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_resume_refuses_a_crafted_pickle_and_runs_no_code(tmp_path: Path) -> None:
    out, marker = tmp_path / "run", tmp_path / "pwned"
    (out / "checkpoints").mkdir(parents=True)
    # Correct header and checksum: only weights_only loading stands between it and the code.
    ck.save_checkpoint(out / "checkpoints", {"model": _Touch(marker), "rng": torch.get_rng_state()}, 5)
    proc = hvd_abs(*TRAIN, "--resume", str(out))
    assert proc.returncode == 2, proc.stderr
    assert "weights_only" in proc.stderr and "no checkpoint there verifies" in proc.stderr
    assert "Traceback" not in proc.stderr and not marker.exists()


def _calls(tree: ast.AST) -> list[tuple[str, ast.Call]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f"{getattr(f.value, 'id', '?')}.{f.attr}" if isinstance(f, ast.Attribute) else getattr(f, "id", "?")
            out.append((name, node))
    return out


def test_nothing_is_unpickled_beyond_weights_only() -> None:
    """Static audit of the package: every torch.load passes weights_only=True; no pickle,
    cloudpickle, marshal or shelve loads, no eval/exec."""
    offenders = []
    for path in sorted((REPO / "hvd_abs").rglob("*.py")):
        for name, call in _calls(ast.parse(path.read_text())):
            where = f"{path.relative_to(REPO)}:{call.lineno}"
            if name == "torch.load":
                kw = {k.arg: k.value for k in call.keywords}
                if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                    offenders.append(f"{where} torch.load without weights_only=True")
            elif name in ("pickle.load", "pickle.loads", "cloudpickle.load", "cloudpickle.loads", "marshal.loads",
                          "shelve.open", "eval", "exec", "dill.load", "dill.loads"):
                offenders.append(f"{where} {name}")
    assert not offenders, offenders


def test_only_unix_sockets_are_bound_by_our_code() -> None:
    """Static audit: the package creates no TCP/UDP listener of its own (socket.bind on AF_UNIX
    only: the standby sockets); the one TCP server it starts is the bound rendezvous below."""
    binds = []
    for path in sorted((REPO / "hvd_abs").rglob("*.py")):
        text = path.read_text()
        for name, call in _calls(ast.parse(text)):
            if name.endswith(".bind") or name.endswith("HTTPServer") or name.endswith("TCPServer"):
                binds.append((path.name, name))
    assert sorted(binds) == [("ray_executor.py", "RendezvousHTTPServer"), ("standby.py", "server.bind")], binds
    assert "socket.AF_UNIX" in (REPO / "hvd_abs" / "launch" / "standby.py").read_text()


def test_ray_rendezvous_listens_on_loopback_only() -> None:
    from horovod.runner.http.http_server import RendezvousHandler

    from hvd_abs.launch.ray_executor import BoundRendezvousServer, _local_network

    assert _local_network("127.0.0.1") == ("lo", "127.0.0.1")  # a cluster on loopback: loopback
    server = BoundRendezvousServer("127.0.0.1")
    port = server.start(RendezvousHandler)
    try:
        assert server._httpd.socket.getsockname()[0] == "127.0.0.1"
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        others = [a.address for addrs in __import__("psutil").net_if_addrs().values() for a in addrs
                  if a.family == socket.AF_INET and not a.address.startswith("127.")]
        for ip in others:  # the machine's other addresses do not reach it
            try:
                socket.create_connection((ip, port), timeout=2).close()
                raise AssertionError(f"the rendezvous answered on {ip}:{port}")
            except ConnectionRefusedError:
                pass
    finally:
        server.stop()


def test_standby_socket_is_owner_only(tmp_path: Path) -> None:
    from hvd_abs.launch.standby import serve

    d = tmp_path / "standby"
    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault("code", serve(d, lambda argv: 0, idle_timeout=30)),
                              daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not list(d.glob("*.ready")):
        time.sleep(0.02)
    socks = list(d.glob("*.sock"))
    assert socks, "the standby did not publish a socket"
    mode = socks[0].stat().st_mode
    assert stat.S_ISSOCK(mode) and mode & 0o077 == 0, oct(mode)
    for p in d.glob("*.ready"):  # withdraw it: the standby sees no claim and ends
        p.unlink()
    thread.join(timeout=10)
    assert result.get("code") == 0
