"""Relayed outputs (hvd_abs/elastic/outputs_relay.py to hvd_abs/launch/job_service.py, real TCP
on 127.0.0.1): what rank 0 sends lands in the launcher's OUT as LocalOutputs writes it, a line a
later rank 0 sends again is written once, checkpoints and model.pt open with plain torch, and a
worker fetches only the job's own --resume folder."""
from __future__ import annotations

import io
import json
import math
import os

import pytest
import torch

from hvd_abs.elastic.job_channel import ADDRESS_ENV, JobChannel
from hvd_abs.elastic.outputs_relay import RelayOutputs, fetch_resume
from hvd_abs.errors import UserError
from hvd_abs.launch.job_service import JobService
from hvd_abs.metrics import EPOCH_FIELDS, read_metrics
from hvd_abs.training.checkpoint import load_checkpoint, save_checkpoint
from hvd_abs.training.run_dir import RELAY_ENV, RESUME_COPY_ENV, checkpoints_of, read_newest_checkpoint


def _epoch(n: int, **changes) -> dict:
    return {**{k: 0 for k in EPOCH_FIELDS}, "epoch": n, "updates": 10 * n, **changes}


def relay(service: JobService) -> RelayOutputs:
    """A rank's outputs as a worker of `service`'s job has them (RELAY_ENV set)."""
    return RelayOutputs(JobChannel.from_env(service.env()))


def in_workers_env(monkeypatch, service: JobService) -> None:
    for k, v in service.env().items():
        monkeypatch.setenv(k, v)


def test_lines_sent_again_by_a_later_rank_0_are_written_once(tmp_path):
    out = tmp_path / "out"
    with JobService(out) as service:
        first = relay(service)
        first.prepare(False, None)
        w = first.writer(0, False)
        w.epoch(**_epoch(1, train_loss=float("nan")))
        w.event("growth", epoch=1, updates=10, old_batch=32, new_batch=64)
        w.event("checkpoint", epoch=1, updates=10, path="x", seconds=0.1)
        # Rank 0's host is lost; the new rank 0 rolled back to update 10 and redoes epoch 2.
        second = relay(service)
        second.prepare(True, None)  # once per job: this changes nothing
        w2 = second.writer(0, False)
        assert second.writer(1, False).enabled is False  # other ranks send nothing
        w2.event("failure", epoch=2, updates=11, world_size=1, stall_s=0.5)
        w2.epoch(**_epoch(1))  # (a rolled-back job sends its epoch again: dropped)
        w2.event("growth", epoch=1, updates=10, old_batch=32, new_batch=64)
        w2.epoch(**_epoch(2))
        w2.event("checkpoint", epoch=2, updates=20, path="y", seconds=0.1)
        epochs, events = read_metrics(out)
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert epochs[0]["train_loss"] is None  # NaN is written as null, as by a local writer
    assert [(e["event"], e["updates"]) for e in events] == [("growth", 10), ("checkpoint", 10), ("failure", 11),
                                                             ("checkpoint", 20)]
    assert RELAY_ENV == ADDRESS_ENV


def test_checkpoints_weights_and_summary_land_in_the_launchers_out(tmp_path):
    out = tmp_path / "out"
    with JobService(out) as service:
        outputs = relay(service)
        outputs.prepare(False, None)
        w = outputs.writer(0, False)
        w.epoch(**_epoch(1))
        w.event("failure", epoch=1, updates=7, world_size=2, stall_s=1.5)
        path = outputs.save_checkpoint({"updates": 10, "w": torch.arange(4.0)}, 10, 3)
        for n in (20, 30, 40):
            outputs.save_checkpoint({"updates": n}, n, 3)
        weights = {"layer.weight": torch.ones(2, 2)}
        buf = io.BytesIO()
        torch.save(weights, buf)
        summary = outputs.finish(buf.getvalue(), {"epochs": 1, "updates": 10, "final": math.inf}, plot=False, writer=w)
    assert path == str(out / "checkpoints" / "ckpt-000010.pt")
    assert sorted(p.name for p in (out / "checkpoints").glob("ckpt-*")) == [
        f"ckpt-0000{n}.pt{s}" for n in (20, 30, 40) for s in ("", ".sha256")]  # the newest 3 kept
    assert (out / "checkpoints" / "last.pt").resolve().name == "ckpt-000040.pt"
    assert load_checkpoint(out / "checkpoints" / "ckpt-000040.pt") == {"updates": 40}
    loaded = torch.load(out / "model.pt", weights_only=True)
    assert torch.equal(loaded["layer.weight"], torch.ones(2, 2))
    written = json.loads((out / "summary.json").read_text())
    assert written["weights"] == str(out / "model.pt") == summary["weights"]
    assert written["resets"] == summary["resets"] == [{"event": "failure", "epoch": 1, "updates": 7, "world_size": 2,
                                                       "stall_s": 1.5}]
    assert written["final"] is None


def test_a_line_the_launcher_cannot_take_is_one_line_to_the_worker(tmp_path):
    with JobService(tmp_path / "out") as service:
        w = relay(service).writer(0, False)
        with pytest.raises(UserError, match=r"outputs cannot reach the launcher's host \(metrics\): .*refused"):
            w._write({"epoch": 1, "nonsense": 1})  # (not EPOCH_FIELDS: the launcher's writer refuses it)
        assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_a_worker_fetches_the_newest_good_checkpoint_of_the_jobs_resume_folder_only(tmp_path, monkeypatch):
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoints", {"updates": 5, "config": {"lr": 0.5}}, 5)
    newest = save_checkpoint(run / "checkpoints", {"updates": 9}, 9)
    newest.write_bytes(newest.read_bytes()[:-3])  # damaged: skipped
    other = tmp_path / "other"
    save_checkpoint(other / "checkpoints", {"updates": 1}, 1)
    monkeypatch.setenv(RESUME_COPY_ENV, "")  # (restored after the test: fetch_resume sets it)
    with JobService(tmp_path / "out", resume=str(run)) as service:
        in_workers_env(monkeypatch, service)
        with pytest.raises(UserError, match="is not this job's --resume folder"):
            fetch_resume({"elastic": True, "resume": str(other)})
        fetch_resume({"elastic": True, "resume": str(run)})
    copy = checkpoints_of(run)
    assert copy != run / "checkpoints" and sorted(p.name for p in copy.glob("ckpt-*")) == ["ckpt-000005.pt",
                                                                                         "ckpt-000005.pt.sha256"]
    path, state = read_newest_checkpoint(run)  # what the worker's resume then reads
    assert path == str(copy / "ckpt-000005.pt") and state["updates"] == 5
    assert checkpoints_of(other) == other / "checkpoints"  # another folder is read where it is


def test_without_an_elastic_resume_nothing_is_fetched(tmp_path, monkeypatch):
    monkeypatch.setenv(RESUME_COPY_ENV, "")
    with JobService(tmp_path / "out") as service:
        in_workers_env(monkeypatch, service)
        fetch_resume({"elastic": False, "resume": str(tmp_path)})
        fetch_resume({"elastic": True, "resume": None})
    assert os.environ[RESUME_COPY_ENV] == ""
