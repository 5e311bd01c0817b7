"""Faults of the real trainer on Ray (issue 7): `hvd-abs launch ray` running `hvd-abs train
--elastic` in Ray actors (hvd_abs.launch.ray_executor).

- A dead worker actor (its process SIGKILLed mid-epoch): the survivor rolls back to the last
  commit and finishes; nothing lost, duplicates only in the rolled-back window. Horovod bars
  the failed worker's *host*, here a Ray node: with both workers on one node the job would
  stop, so the workers run on two fake 1-CPU nodes of a `ray.cluster_utils.Cluster`
  (tests/workers/ray_fake_nodes.py), as on a real cluster with one worker per node.
- The whole job SIGKILLed (the launcher, the local Ray cluster it started, the actors), then
  `--resume`: on 1 worker with fixed seeds the metrics equal an uninterrupted run's.

Kills are pinned to known updates with the ledger's hold files (see test_faults_horovod.py).
"""
from __future__ import annotations

import json
import os
import signal
import time

import pytest

from conftest import launch_ray
from hvd_abs.metrics import read_metrics
from test_elastic_horovod import check_every_sample_once, check_ranks_identical_after_sync
from test_faults_horovod import (COMMIT_EVERY, EPOCH_UPDATES, KILL_AT, SGD2, alive, comparable, held_worker, holds,
                                 ledger, record, rollback_report, wait_until)

pytestmark = pytest.mark.multiprocess


def test_dead_worker_actor_rolls_back_and_finishes(tmp_path, jobs, fake_ray):
    out = tmp_path / "run"
    gates = holds(out, "hold-1-world-2", f"hold-{KILL_AT}")
    job = jobs(launch_ray(fake_ray(2).address, "--max-workers", "2", "--", *SGD2, "--epochs", "6", "--out", str(out)),
               tmp_path / "job.log")
    victim = wait_until(f"rank 1 at update {KILL_AT} with 2 workers", held_worker(out, KILL_AT, 1), job)
    os.kill(victim, signal.SIGKILL)  # the actor's process: Ray reports the actor dead
    t_kill = time.monotonic()
    for gate in gates.glob("hold-*"):
        gate.unlink()
    assert job.wait(timeout=300) == 0, job.output()[-6000:]
    epochs, events = read_metrics(out)
    assert [e["epoch"] for e in epochs] == list(range(1, 7))
    failures = [e for e in events if e["event"] == "failure"]
    assert len(failures) == 1 and failures[0]["world_size"] == 1 and failures[0]["stall_s"] >= 0, events
    check_every_sample_once(out)
    check_ranks_identical_after_sync(out)
    report = rollback_report(out, COMMIT_EVERY)
    assert failures[0]["updates"] - 1 == 24 and report["rolled_back_updates"][:6] == list(range(25, 31)), report
    assert json.loads((out / "summary.json").read_text())["updates"] == 6 * EPOCH_UPDATES
    record("ray: dead worker actor (rank 1) mid-epoch, 2 fake nodes", result="rolled back, finished",
           stall_s=failures[0]["stall_s"], reinit_s=failures[0]["reinit_s"], failed_at_update=24,
           job_s_after_kill=round(time.monotonic() - t_kill, 1), **report)


def test_whole_job_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, jobs):
    args = ["--dataset", "digits", "--model", "cnn", "--method", "absa", "--base-batch", "32", "--batch", "32",
            "--max-batch", "128", "--duration", "1", "--epochs", "4", "--eig-samples", "256", "--seed", "5",
            "--threads", "1", "--quiet", "--callback", "hvd_abs.testing.ledger:Ledger", "--checkpoint-every", "1", "--commit-every", "5"]
    ref, out = tmp_path / "ref", tmp_path / "run"
    one = ("--max-workers", "1")
    uninterrupted = jobs(launch_ray("local", *one, "--", *args, "--out", str(ref)), tmp_path / "ref.log")
    assert uninterrupted.wait(timeout=300) == 0, uninterrupted.output()[-6000:]

    ep_ref, ev_ref = read_metrics(ref)
    kill_at = ep_ref[1]["updates"] + 5  # 5 updates into epoch 3, after two disk checkpoints
    gates = holds(out, f"hold-{kill_at}")
    job = jobs(launch_ray("local", *one, "--", *args, "--out", str(out)), tmp_path / "job.log")
    wait_until(f"update {kill_at}", lambda: any(r["update"] == kill_at for r in ledger(out)), job)
    killed = job.kill_all()  # the launcher, the Ray cluster it started, the actor
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and [p for p in killed if alive(p)]:
        time.sleep(0.1)
    assert not [p for p in killed if alive(p)], "a process of the job survived SIGKILL"
    assert not [p for p in {r["pid"] for r in ledger(out)} if alive(p)], "a worker actor outlived the job"
    assert not (out / "summary.json").exists()
    epochs_before = len(read_metrics(out)[0])
    for gate in gates.glob("hold-*"):
        gate.unlink()

    resumed = jobs(launch_ray("local", *one, "--", *args, "--out", str(out), "--resume", str(out)),
                   tmp_path / "resume.log")
    assert resumed.wait(timeout=300) == 0, resumed.output()[-6000:]
    ep_out, ev_out = read_metrics(out)
    assert len(ep_out) == 4 and comparable(ep_out) == comparable(ep_ref)
    growth = lambda evs: [e for e in evs if e["event"] == "growth"]  # noqa: E731
    assert growth(ev_out) == growth(ev_ref) and growth(ev_ref), "the batch must have grown"
    check_every_sample_once(out)
    record("ray: SIGKILL whole job (launcher + local cluster + actor, 1 worker), --resume",
           result="resumed run == uninterrupted run", epochs_before_kill=epochs_before, samples_lost=0, stall_s=None,
           rolled_back_updates=rollback_report(out, 5 * EPOCH_UPDATES)["rolled_back_updates"])
