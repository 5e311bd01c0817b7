"""The job channel between workers and their launcher (hvd_abs/elastic/job_channel.py and
hvd_abs/launch/job_service.py) over real TCP on 127.0.0.1: requests with the job's key are
carried out, anyone else (no key, a wrong key, a replayed request) is refused and changes
nothing, and a peer that misbehaves does not stop the service."""
from __future__ import annotations

import json
import socket
import struct

import pytest

from hvd_abs.elastic.job_channel import GREETING, ChannelError, JobChannel, mac, new_key, recv_line
from hvd_abs.elastic.world_signal import publish_wanted, read_wanted
from hvd_abs.launch.job_service import JobService


def test_a_request_with_the_key_is_carried_out(tmp_path):
    with JobService(tmp_path) as service:
        JobChannel.from_env(service.env()).request("world_size", world_size=3, reason="growth")
        assert read_wanted(tmp_path) == 3
        publish_wanted(tmp_path, 2, "shrink", env=service.env())  # what rank 0 calls
        assert read_wanted(tmp_path) == 2
        assert service.refused == 0


def test_without_a_channel_the_request_is_a_local_file(tmp_path):
    publish_wanted(tmp_path, 4, "growth", env={})
    assert read_wanted(tmp_path) == 4


def test_a_wrong_key_is_refused_and_changes_nothing(tmp_path):
    with JobService(tmp_path) as service:
        JobChannel.from_env(service.env()).request("world_size", world_size=1)
        env = {**service.env(), "HVD_ABS_JOB_KEY": new_key()}
        with pytest.raises(ChannelError, match="not authenticated"):
            JobChannel.from_env(env).request("world_size", world_size=4)
        assert read_wanted(tmp_path) == 1
        assert service.refused == 1


def _raw_request(address: str, header: bytes, tag: bytes) -> dict:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        nonce = bytes.fromhex(recv_line(sock)[len(GREETING):].decode())
        sock.sendall(struct.pack(">I", len(header)) + header + (tag or mac(b"", nonce, header)))
        return json.loads(recv_line(sock))


def test_a_replayed_request_is_refused(tmp_path):
    """A request recorded on the wire answers an old nonce: on a new connection it fails."""
    with JobService(tmp_path) as service:
        key = bytes.fromhex(service.key)
        header = json.dumps({"op": "world_size", "world_size": 5, "size": 0,
                             "sha256": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"}).encode()
        recorded = mac(key, b"\0" * 32, header)  # signed for another connection's nonce
        answer = _raw_request(service.address, header, recorded)
        assert answer == {"ok": False, "error": "not authenticated: this job's key is missing or wrong"}
        assert read_wanted(tmp_path) is None
        assert service.refused == 1


def test_misbehaving_peers_do_not_stop_the_service(tmp_path):
    with JobService(tmp_path) as service:
        host, port = service.address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as sock:  # says nothing, leaves
            recv_line(sock)
        with socket.create_connection((host, int(port)), timeout=10) as sock:  # a huge header length
            recv_line(sock)
            sock.sendall(struct.pack(">I", 1 << 30))
            assert json.loads(recv_line(sock))["ok"] is False
        channel = JobChannel.from_env(service.env())
        with pytest.raises(ChannelError, match="world size must be an integer"):
            channel.request("world_size", world_size=0)
        with pytest.raises(ChannelError, match="unknown request"):
            channel.request("format_disk")
        channel.request("world_size", world_size=2)
        assert read_wanted(tmp_path) == 2


def test_an_unreachable_launcher_is_a_channel_error(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    channel = JobChannel(f"127.0.0.1:{port}", new_key(), timeout_s=0.5)
    with pytest.raises(ChannelError, match="did not answer within 0.5 s"):
        channel.request("world_size", world_size=2)


def test_a_half_set_environment_is_refused():
    with pytest.raises(ChannelError, match="HVD_ABS_JOB_KEY is not"):
        JobChannel.from_env({"HVD_ABS_JOB_SERVICE": "127.0.0.1:1"})
    assert JobChannel.from_env({}) is None
