"""One-process tests of the elastic layer's pieces: world-size signal, discovery, checkpoints,
the horovodrun command line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hvd_abs.training import checkpoint as ck
from hvd_abs.launch.discovery import HostfileError, discover, parse_hostfile, select_hosts
from hvd_abs.elastic.world_signal import SignalError, read_wanted, signal_path, start_job, write_wanted
from hvd_abs.launch.horovod import build_command


def test_signal_round_trip_and_validation(tmp_path):
    assert read_wanted(tmp_path) is None
    write_wanted(tmp_path, 3, reason="growth")
    assert read_wanted(tmp_path) == 3
    assert oct(signal_path(tmp_path).stat().st_mode & 0o777) == "0o600"
    for bad in (0, -1, 2.0, "2", 10**9):
        with pytest.raises(SignalError):
            write_wanted(tmp_path, bad)
    for text in ("{", "[]", '{"world_size": "2"}', '{"world_size": 0}', '{"world_size": true}'):
        signal_path(tmp_path).write_text(text)
        with pytest.raises(SignalError):
            read_wanted(tmp_path)


def test_a_new_job_forgets_the_previous_jobs_signal(tmp_path):
    write_wanted(tmp_path, 4)  # what the last job in this run dir asked for
    (tmp_path / "elastic" / "advertised.json").write_text('{"advertised": 4, "waiting_since": 0}')
    (tmp_path / "elastic" / "standby").mkdir()
    (tmp_path / "elastic" / "standby" / "123.claimed.456").touch()
    start_job(tmp_path, 1)
    assert read_wanted(tmp_path) == 1
    assert not (tmp_path / "elastic" / "advertised.json").exists()
    assert not (tmp_path / "elastic" / "standby").exists()
    assert discover(str(tmp_path), [("a", 4)], min_np=1, max_np=4)[0] == [("a", 1)]


def test_hostfile_forms_and_errors():
    pool = parse_hostfile("# pool\nnode1 slots=2\nnode2:3\n\n127.0.0.1   # one slot\n")
    assert pool == [("node1", 2), ("node2", 3), ("127.0.0.1", 1)]
    for bad in ("node1 slots=x", "node1:0", "bad host name", "node1 slots=2 extra", "-rf:2", ""):
        with pytest.raises(HostfileError):
            parse_hostfile(bad)
    with pytest.raises(HostfileError, match="line 2"):
        parse_hostfile("ok:1\n;rm:1\n")


def test_select_and_discover_follow_the_signal(tmp_path):
    pool = [("a", 2), ("b", 2)]
    assert select_hosts(pool, 3) == [("a", 2), ("b", 1)]
    assert discover(str(tmp_path), pool, min_np=1, max_np=4)[0] == [("a", 1)]  # nothing published yet
    write_wanted(tmp_path, 8)
    assert discover(str(tmp_path), pool, min_np=1, max_np=3)[0] == [("a", 2), ("b", 1)]  # max-np caps
    signal_path(tmp_path).write_text("garbage")
    hosts, note = discover(str(tmp_path), pool, min_np=2, max_np=4)
    assert hosts == [("a", 2)] and "malformed" in note


def test_discovery_script_prints_hosts(tmp_path):
    write_wanted(tmp_path, 2)
    out = subprocess.run([sys.executable, "launch/discover_hosts.py", "--run-dir", str(tmp_path), "--max-np", "4"],
                         capture_output=True, text=True, check=True).stdout
    assert out == "localhost:1\n127.0.0.1:1\n"  # this machine under two names (see local_pool)
    hostfile = tmp_path / "hosts"
    hostfile.write_text("good:1\nbad line here\n")
    proc = subprocess.run([sys.executable, "-m", "hvd_abs.launch.discovery", "--run-dir", str(tmp_path),
                           "--max-np", "4", "--hostfile", str(hostfile)], capture_output=True, text=True)
    assert proc.returncode == 2 and "line 2" in proc.stderr and proc.stdout == ""


def _state() -> dict:
    return {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "counters": {"updates": 7}, "rng": torch.get_rng_state()}


def test_checkpoint_round_trip_and_rotation(tmp_path):
    for updates in (1, 2, 3, 4):
        ck.save_checkpoint(tmp_path, _state(), updates, keep=3)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["ckpt-000002.pt", "ckpt-000003.pt", "ckpt-000004.pt"]
    path, state = ck.load_latest(tmp_path)
    assert path.name == "ckpt-000004.pt"
    assert torch.equal(state["model"]["w"], torch.arange(6.0).reshape(2, 3)) and state["counters"]["updates"] == 7
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


@pytest.mark.parametrize("damage", ["truncate", "flip", "header", "empty"])
def test_damaged_checkpoint_rejected_and_previous_used(tmp_path, damage):
    ck.save_checkpoint(tmp_path, _state(), 1)
    newest = ck.save_checkpoint(tmp_path, {"counters": {"updates": 2}}, 2)
    data = newest.read_bytes()
    newest.write_bytes({"truncate": data[:-10], "flip": data[:-5] + bytes([data[-5] ^ 1]) + data[-4:],
                        "header": b"X" + data[1:], "empty": b""}[damage])
    with pytest.raises(ck.CheckpointError):
        ck.load_checkpoint(newest)
    path, state = ck.load_latest(tmp_path)
    assert path.name == "ckpt-000001.pt" and state["counters"]["updates"] == 7


def test_a_checkpoint_is_a_plain_torch_file_with_its_sha256_beside_it(tmp_path):
    import hashlib
    import subprocess

    for updates in (1, 2, 3):
        ck.save_checkpoint(tmp_path, _state(), updates, keep=2)
    newest = tmp_path / "ckpt-000003.pt"
    assert sorted(os.listdir(tmp_path)) == ["ckpt-000002.pt", "ckpt-000002.pt.sha256", "ckpt-000003.pt",
                                            "ckpt-000003.pt.sha256", "last.pt"]
    plain = torch.load(tmp_path / "last.pt", weights_only=True)  # no hvd_abs needed to open one
    assert torch.equal(plain["model"]["w"], _state()["model"]["w"])
    check = subprocess.run(["sha256sum", "-c", "ckpt-000003.pt.sha256"], cwd=tmp_path, capture_output=True, text=True)
    assert check.returncode == 0 and "ckpt-000003.pt: OK" in check.stdout
    assert ck.load_checkpoint(tmp_path / "last.pt")["counters"]["updates"] == 7
    # Without its checksum (a write cut short between the two files) it is not trusted.
    (tmp_path / "ckpt-000003.pt.sha256").unlink()
    with pytest.raises(ck.CheckpointError, match="no readable checksum"):
        ck.load_checkpoint(newest)
    assert ck.load_latest(tmp_path)[0].name == "ckpt-000002.pt"
    # The earlier format (a header line with the checksum before the payload) still loads.
    payload = newest.read_bytes()
    old = tmp_path / "ckpt-000009.pt"
    old.write_bytes(ck.MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)
    assert ck.load_latest(tmp_path)[0] == old and ck.is_checkpoint(old)


def test_rotation_never_deletes_the_checkpoint_it_wrote(tmp_path):
    """A resume from an older checkpoint writes below a higher count left behind; a file without
    its checksum (a write cut short) is no checkpoint: removed, not counted."""
    ck.save_checkpoint(tmp_path, _state(), 100, keep=1)
    (tmp_path / "ckpt-000300.pt").write_bytes(b"cut short")
    ck.save_checkpoint(tmp_path, _state(), 400, keep=2)  # (a good one above, as after a failure)
    (tmp_path / "ckpt-000500.pt").write_bytes(b"cut short")
    path = ck.save_checkpoint(tmp_path, _state(), 200, keep=2)
    assert sorted(p.name for p in tmp_path.glob("ckpt-*.pt")) == ["ckpt-000200.pt", "ckpt-000400.pt"]
    assert (tmp_path / "last.pt").resolve() == path.resolve() and ck.load_checkpoint(path)


class _Evil:
    """Stands for any object whose unpickling would run code."""


def test_checkpoint_refuses_pickled_objects(tmp_path):
    # A well-formed, correctly checksummed file whose payload needs arbitrary unpickling.
    path = ck.save_checkpoint(tmp_path, {"x": _Evil()}, 1)
    with pytest.raises(ck.CheckpointError, match="weights_only"):
        ck.load_checkpoint(path)


def test_horovodrun_command():
    cmd = build_command(["--dataset", "digits", "--out", "runs/x"], min_np=1, max_np=2, python="py")
    assert cmd[:8] == ["horovodrun", "--gloo", "-np", "1", "--min-np", "1", "--max-np", "2"]
    assert cmd[cmd.index("--network-interface") + 1] == "lo"
    script = cmd[cmd.index("--host-discovery-script") + 1]
    assert script.startswith("py -m hvd_abs.launch.discovery --run-dir ") and "--max-np 2" in script
    assert cmd[cmd.index("train") + 1:] == ["--elastic", "--max-np", "2", "--dataset", "digits", "--out", "runs/x"]
    with pytest.raises(ValueError, match="--out"):
        build_command(["--dataset", "digits"], min_np=1, max_np=2)
    # Given twice, --out is the last one (as click reads it): discovery must watch where training writes.
    cmd = build_command(["--out", "runs/a", "--out=runs/b"], min_np=1, max_np=2, python="py")
    assert cmd[cmd.index("--host-discovery-script") + 1].split("--run-dir ")[1].startswith(str(Path("runs/b").resolve()))


def test_warm_growth_waits_for_standbys_up_to_the_warm_timeout(tmp_path, capsys):
    from hvd_abs.launch import discovery

    def poll(*extra: str) -> list[str]:
        assert discovery.main(["--run-dir", str(tmp_path), "--max-np", "2", "--warm", *extra]) == 0
        return capsys.readouterr().out.split()

    start_job(tmp_path, 1)
    assert poll() == ["localhost:1"]
    write_wanted(tmp_path, 2)  # growth, no standby ready: wait (the job accumulates meanwhile)
    assert poll() == ["localhost:1"]
    assert poll("--warm-timeout", "3600") == ["localhost:1"]
    assert poll("--warm-timeout", "0") == ["localhost:1", "127.0.0.1:1"]  # waited long enough: cold
    assert discovery.main(["--run-dir", str(tmp_path), "--max-np", "2", "--warm", "--warm-timeout", "-1"]) == 2
    assert "--warm-timeout" in capsys.readouterr().err
    cmd = build_command(["--out", str(tmp_path)], min_np=1, max_np=2, python="py", warm=True, warm_timeout=7.5)
    assert "--warm --warm-timeout 7.5" in cmd[cmd.index("--host-discovery-script") + 1]


def test_warm_growth_goes_only_where_the_next_slots_standby_is_ready(tmp_path, capsys):
    """Slots are filled in pool order: a standby ready on host C does not make host B's slot
    warm; and a ready standby promised to a slot not yet claimed is not counted twice."""
    from hvd_abs.launch import discovery
    from hvd_abs.launch.standby_pool import ready_path

    hostfile = tmp_path / "hosts"
    hostfile.write_text("A slots=1\nB slots=1\nC slots=2\n")

    def poll() -> list[str]:
        assert discovery.main(["--run-dir", str(tmp_path), "--hostfile", str(hostfile), "--max-np", "4", "--warm",
                               "--warm-timeout", "3600"]) == 0
        return capsys.readouterr().out.split()

    def standbys(ready: dict, claimed: dict) -> None:
        ready_path(tmp_path).write_text(json.dumps({"ready": ready, "claimed": claimed,
                                                    "machine": {"A": "local", "B": "B", "C": "C"}}))

    start_job(tmp_path, 1)
    assert poll() == ["A:1"]
    write_wanted(tmp_path, 4)
    ready_path(tmp_path).parent.mkdir(parents=True, exist_ok=True)
    standbys({"C": 2}, {})
    assert poll() == ["A:1"]  # B's slot comes first and B has no standby
    standbys({"B": 1, "C": 2}, {})
    assert poll() == ["A:1", "B:1", "C:2"]
    write_wanted(tmp_path, 1)
    assert poll() == ["A:1"]
    write_wanted(tmp_path, 2)
    standbys({"B": 1}, {"B": 1})
    assert poll() == ["A:1", "B:1"]  # B's second standby, ready: the slot is promised to it
    write_wanted(tmp_path, 1)
    assert poll() == ["A:1"]
    write_wanted(tmp_path, 2)
    assert poll() == ["A:1"]  # still unclaimed: promised already, not free for another slot
    standbys({"B": 1}, {"B": 2})  # claimed, and a third one ready
    assert poll() == ["A:1", "B:1"]


def test_a_pool_of_this_machine_uses_loopback():
    from hvd_abs.launch.hosts import HostError, choose_interface, interface_address, remote_hosts

    assert remote_hosts(["localhost", "127.0.0.1"]) == []
    assert choose_interface(["localhost", "127.0.0.1"], None) == "lo"
    assert choose_interface(["localhost"], "eth7") == "eth7"  # as given
    assert interface_address("lo") == "127.0.0.1"
    with pytest.raises(HostError, match="no IPv4 address on it; pick one of"):
        interface_address("no-such-nic0")


def test_a_slot_looks_for_its_standby_on_its_own_host():
    """warm_exec: a slot of a remote host (HOROVOD_HOSTNAME) claims from that host's folder, where
    the launcher started its standbys; a slot of this machine, from the run dir's."""
    from hvd_abs.launch.warm_exec import standby_folder

    options = {"--standby-dir": "/run/OUT/elastic/standby", "--remote-dir": "/tmp/hvd_abs-standby-ab12",
               "--local-hosts": "localhost,10.0.0.1"}
    assert standby_folder(options, "10.0.0.2") == "/tmp/hvd_abs-standby-ab12/10.0.0.2"
    assert standby_folder(options, "10.0.0.1") == "/run/OUT/elastic/standby"
    assert standby_folder(options, None) == "/run/OUT/elastic/standby"
    assert standby_folder({"--standby-dir": "/d"}, "10.0.0.2") == "/d"  # a pool of this machine only


def test_next_slots_follow_the_pool_order():
    from hvd_abs.launch.standby_pool import pool_slots

    assert pool_slots([("A", 1), ("B", 2), ("C", 1)]) == ["A", "B", "B", "C"]


@pytest.mark.multiprocess
def test_a_standby_says_ready_and_leaves_when_the_launchers_pipe_closes(tmp_path):
    """A standby on a remote host is reached only through ssh: its stdout tells the launcher it
    is ready, and when the launcher's pipe closes (the launcher gone) it exits, leaving nothing
    running there."""
    from hvd_abs.launch.standby import READY_WORD

    proc = subprocess.Popen([sys.executable, "-m", "hvd_abs.launch.standby", "--dir", str(tmp_path / "s"),
                             "--until-stdin-closes", "--script", "--"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == READY_WORD
        assert list((tmp_path / "s").glob("*.ready"))
        proc.stdin.close()
        assert proc.wait(timeout=20) == 0
    finally:
        proc.kill()
