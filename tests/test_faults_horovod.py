"""Faults under real `hvd-abs launch horovod` on one machine (issue 7): a worker SIGKILLed
mid-epoch, rank 0 SIGKILLed, the whole job SIGKILLed and resumed from disk.

One machine, several workers: Horovod blacklists a *host* when one of its workers fails, and
stops the job when every host that still holds a worker is blacklisted. With every worker on
`localhost` (the launcher's default pool) one failure therefore ends the job, whatever the
blacklist cooldown. A hostfile naming the machine twice, `localhost slots=1` and
`127.0.0.1 slots=1` (both resolve to a local address, so horovodrun starts them without ssh),
puts rank 0 and rank 1 on different "hosts": a failure bars only the failed worker's name,
the survivor rolls back to the last commit and goes on, and the cooldown (5-30 s by default)
lets the barred name back in later. Names like 127.0.0.2 do not work: horovodrun only starts
hosts whose address one of the machine's interfaces holds, and would try ssh.

Every kill is gated on observed progress (the sample ledger of `--callback hvd_abs.testing.ledger:Ledger`, metrics.jsonl),
never on a sleep, and every job runs in its own session with a timeout.
"""
from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable

import psutil
import pytest

from conftest import BIN, Job
from hvd_abs.metrics import read_metrics
from test_elastic_horovod import check_every_sample_once, check_ranks_identical_after_sync
from test_elastic_horovod import ledger_records as ledger

pytestmark = pytest.mark.multiprocess

TWO_HOSTS = "localhost slots=1\n127.0.0.1 slots=1\n"
EPOCH_UPDATES = 22  # digits: 1437 training samples // global batch 64
COMMIT_EVERY = 8
KILL_AT = 30  # update 30: epoch 2, 6 updates after the commit at 24
# sgd at global batch 64 = 2 x 32: the job wants 2 workers from its first update.
SGD2 = ["--dataset", "digits", "--model", "cnn", "--method", "sgd", "--base-batch", "32", "--batch", "64",
        "--quiet", "--callback", "hvd_abs.testing.ledger:Ledger", "--threads", "1", "--commit-every", str(COMMIT_EVERY)]
TIMING = {"epoch_s", "samples_per_s", "second_order_s"}


# ---------------------------------------------------------------------------------------------
# Helpers: a job in its own session, the ledger, progress gates
# ---------------------------------------------------------------------------------------------

def launch_horovod(*args: str) -> list[str]:
    return [str(BIN / "hvd-abs"), "launch", "horovod", *args]


def wait_until(what: str, pred: Callable[[], Any], job: Job, timeout: float = 240) -> Any:
    """Poll `pred` until it returns something truthy; fail if the job ends first or on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        if job.proc.poll() is not None:
            pytest.fail(f"the job ended (exit {job.proc.returncode}) before {what}\n{job.output()[-6000:]}")
        time.sleep(0.02)
    pytest.fail(f"timed out after {timeout}s waiting for {what}\n{job.output()[-6000:]}")


def holds(out: Path, *names: str) -> Path:
    """Create the ledger's hold files (hvd_abs/testing/ledger.py `Holds`) before the job starts:
    `hold-U` stops every rank after update U while it exists; `hold-U-world-W` waits there for W workers."""
    d = out / "ledger"
    d.mkdir(parents=True, exist_ok=True)
    for name in names:
        (d / name).touch()
    return d


def held_worker(out: Path, update: int, rank: int, world_size: int = 2) -> Callable[[], int | None]:
    """A gate: the pid of the worker at `rank` once it has run `update` in a world of `world_size`."""
    def pred() -> int | None:
        hits = [r for r in ledger(out) if r["update"] == update and r["rank"] == rank and r["world_size"] == world_size]
        return hits[-1]["pid"] if hits else None
    return pred


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def rollback_report(out: Path, commit_every: int) -> dict[str, Any]:
    """Check the raw ledger against the committed history and return what was rolled back.

    Committed history: for each update number, its latest attempt. Every other record was
    rolled back. Checks: a sample id that occurs more than once in an epoch occurs once in the
    committed history, all its other occurrences are rolled-back records; every rolled-back
    sample is in the committed history of its epoch (nothing lost); rolled-back updates of each
    failed attempt lie within one commit window after the point the job went back to."""
    records = ledger(out)
    latest: dict[int, int] = {}
    for r in records:
        latest[r["update"]] = max(latest.get(r["update"], 0), r["attempt"])
    committed: dict[int, Counter] = defaultdict(Counter)
    rolled: dict[int, Counter] = defaultdict(Counter)
    rolled_updates: dict[int, set[int]] = defaultdict(set)  # attempt -> its rolled-back updates
    for r in records:
        if r["attempt"] == latest[r["update"]]:
            committed[r["epoch"]].update(r["ids"])
        else:
            rolled[r["epoch"]].update(r["ids"])
            rolled_updates[r["attempt"]].add(r["update"])
    for epoch, ids in committed.items():
        assert max(ids.values()) == 1, f"epoch {epoch}: a committed sample was processed twice"
    for epoch, ids in rolled.items():
        lost = set(ids) - set(committed[epoch])
        assert not lost, f"epoch {epoch}: rolled-back samples never redone: {sorted(lost)[:10]}"
    for attempt, updates in rolled_updates.items():
        back_to = min(updates) - 1  # the commit the job restored
        assert max(updates) - back_to <= commit_every, (attempt, sorted(updates))
    return {"rolled_back_updates": sorted(u for us in rolled_updates.values() for u in us),
            "rolled_back_samples": sum(sum(c.values()) for c in rolled.values()),
            "samples_lost": 0}


def record(scenario: str, **fields: Any) -> None:
    """Append a line to $HVD_ABS_FAULT_REPORT (when set) for the issue's table."""
    path = os.environ.get("HVD_ABS_FAULT_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"scenario": scenario, **fields}) + "\n")


def comparable(epochs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in e.items() if k not in TIMING} for e in epochs]


# ---------------------------------------------------------------------------------------------
# The scenarios
# ---------------------------------------------------------------------------------------------

def _kill_one_rank(tmp_path: Path, jobs, rank: int) -> tuple[Path, dict[str, Any], float]:
    out, hostfile = tmp_path / "run", tmp_path / "hosts"
    hostfile.write_text(TWO_HOSTS)
    # The job waits after update 1 for its second worker, and stops after update KILL_AT (mid-epoch
    # 2, KILL_AT - 24 updates after a commit) until the victim is dead.
    gates = holds(out, "hold-1-world-2", f"hold-{KILL_AT}")
    job = jobs(launch_horovod("--min-np", "1", "--max-np", "2", "--hostfile", str(hostfile), "--",
                              *SGD2, "--epochs", "8", "--out", str(out)), tmp_path / "job.log")
    victim = wait_until(f"rank {rank} at update {KILL_AT} with 2 workers", held_worker(out, KILL_AT, rank), job)
    os.kill(victim, signal.SIGKILL)
    t_kill = time.monotonic()
    for gate in gates.glob("hold-*"):
        gate.unlink()
    code = job.wait(timeout=300)
    assert code == 0, job.output()[-6000:]
    epochs, events = read_metrics(out)
    assert [e["epoch"] for e in epochs] == list(range(1, 9)), job.output()[-4000:]
    failures = [e for e in events if e["event"] == "failure"]
    assert len(failures) == 1, events
    failure = failures[0]
    assert failure["world_size"] == 1 and failure["stall_s"] is not None and failure["stall_s"] >= 0, failure
    check_every_sample_once(out)
    check_ranks_identical_after_sync(out)
    report = rollback_report(out, COMMIT_EVERY)
    report.update(stall_s=failure["stall_s"], reinit_s=failure["reinit_s"], failed_at_update=failure["updates"] - 1,
                  rejoined=any(e["event"] == "resize" and e["world_size"] == 2 and e["updates"] > failure["updates"]
                               for e in events),
                  final_world=epochs[-1]["world_size"], job_s_after_kill=round(time.monotonic() - t_kill, 1))
    return out, report, t_kill


def test_sigkill_rank1_mid_epoch_rolls_back_and_finishes(tmp_path, jobs):
    out, report, _ = _kill_one_rank(tmp_path, jobs, rank=1)
    # Rolled back: what ran after the commit at update 24 (25..30, and 31 where it started).
    assert report["failed_at_update"] == 24 and report["rolled_back_updates"][:6] == list(range(25, 31)), report
    summary = json.loads((out / "summary.json").read_text())
    assert summary["updates"] == 8 * EPOCH_UPDATES
    record("horovod: SIGKILL rank 1 mid-epoch (hosts localhost + 127.0.0.1)", result="rolled back, finished",
           **report)


def test_sigkill_rank0_survivor_continues_when_it_is_on_another_host(tmp_path, jobs):
    out, report, _ = _kill_one_rank(tmp_path, jobs, rank=0)
    assert report["failed_at_update"] == 24 and report["rolled_back_updates"][:6] == list(range(25, 31)), report
    # The survivor became rank 0: it wrote the last epochs, the summary and the final checkpoint.
    summary = json.loads((out / "summary.json").read_text())
    assert summary["updates"] == 8 * EPOCH_UPDATES
    assert (out / "checkpoints" / f"ckpt-{8 * EPOCH_UPDATES:06d}.pt").exists()
    record("horovod: SIGKILL rank 0 mid-epoch (hosts localhost + 127.0.0.1)",
           result="survivor became rank 0, finished", **report)


def test_sigkill_rank0_on_one_host_name_fails_fast_then_resume_recovers(tmp_path, jobs):
    """A pool naming every worker `localhost`: Horovod cannot continue after a failure (the only
    host is barred). The job must stop soon with a message saying how to resume, and `--resume`
    must continue from the newest checkpoint on disk."""
    out, hostfile = tmp_path / "run", tmp_path / "hosts"
    hostfile.write_text("localhost slots=2\n")
    args = [*SGD2, "--epochs", "8", "--checkpoint-every", "1", "--out", str(out)]
    gates = holds(out, "hold-1-world-2", f"hold-{KILL_AT}")  # a disk checkpoint at update 22 first
    job = jobs(launch_horovod("--min-np", "1", "--max-np", "2", "--hostfile", str(hostfile), "--", *args),
               tmp_path / "job.log")
    victim = wait_until(f"rank 0 at update {KILL_AT} with 2 workers", held_worker(out, KILL_AT, 0), job)
    os.kill(victim, signal.SIGKILL)
    t_kill = time.monotonic()
    for gate in gates.glob("hold-*"):
        gate.unlink()
    code = job.wait(timeout=120)  # fails fast: well inside the elastic timeout (600 s) it would wait out
    failed_after_s = time.monotonic() - t_kill  # reported (record below), not a pass/fail line
    text = job.output()
    assert code != 0, text[-4000:]
    last_line = [ln for ln in text.splitlines() if ln.strip()][-1]
    assert last_line.startswith("Error: the elastic job failed") and f"--resume {out}" in last_line, last_line
    assert not [p for p in {r["pid"] for r in ledger(out)} if alive(p)], "a worker outlived the job"
    done_before = len(read_metrics(out)[0])

    resumed = jobs(launch_horovod("--min-np", "1", "--max-np", "2", "--hostfile", str(hostfile), "--", *args,
                                  "--resume", str(out)),
                   tmp_path / "resume.log")
    assert resumed.wait(timeout=300) == 0, resumed.output()[-6000:]
    epochs, events = read_metrics(out)
    assert [e["epoch"] for e in epochs] == list(range(1, 9))
    check_every_sample_once(out)  # across both runs: the resumed run's attempts supersede
    report = rollback_report(out, EPOCH_UPDATES)  # rolled back to the last disk checkpoint (epoch end)
    record("horovod: SIGKILL rank 0, one host name", result=f"job stopped after {failed_after_s:.1f}s, "
           f"--resume finished", epochs_before_kill=done_before, stall_s=None,
           **{k: v for k, v in report.items() if k != "stall_s"})


def test_whole_job_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, jobs):
    """1 worker, fixed seeds, ABSA with batch growth: kill the launcher and every process under
    it mid-epoch after a disk checkpoint, resume (from an older checkpoint: the newest is lost);
    the epoch lines (all non-timing fields) and growth events equal those of an uninterrupted run:
    the same controller, LR, adversarial schedule, sampler position and RNG state came back from
    the checkpoint, and the lines of the work redone were replaced."""
    args = ["--dataset", "digits", "--model", "cnn", "--method", "absa", "--base-batch", "32", "--batch", "32",
            "--max-batch", "128", "--duration", "1", "--epochs", "5", "--eig-samples", "256", "--seed", "3",
            "--threads", "1", "--quiet", "--callback", "hvd_abs.testing.ledger:Ledger", "--checkpoint-every", "1", "--commit-every", "5"]
    ref, out = tmp_path / "ref", tmp_path / "run"
    one = ("--min-np", "1", "--max-np", "1")
    uninterrupted = jobs(launch_horovod(*one, "--", *args, "--out", str(ref)), tmp_path / "ref.log")
    assert uninterrupted.wait(timeout=300) == 0, uninterrupted.output()[-6000:]

    # Stop it 5 updates into epoch 3, after two disk checkpoints (epochs 1 and 2).
    ep_ref = read_metrics(ref)[0]
    kill_at = ep_ref[1]["updates"] + 5
    gates = holds(out, f"hold-{kill_at}")
    job = jobs(launch_horovod(*one, "--", *args, "--out", str(out)), tmp_path / "job.log")
    wait_until(f"update {kill_at}", lambda: any(r["update"] == kill_at for r in ledger(out)), job)
    killed = job.kill_all()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and [p for p in killed if alive(p)]:
        time.sleep(0.1)
    assert not [p for p in killed if alive(p)], "a process of the job survived SIGKILL"
    assert not (out / "summary.json").exists()
    epochs_before = len(read_metrics(out)[0])
    for gate in gates.glob("hold-*"):
        gate.unlink()
    # Epoch 2's checkpoint lost too: the resume starts from epoch 1's, and epoch 2's line (marked
    # here) is work it redoes: the line must be replaced by the redone epoch's, not kept.
    (out / "checkpoints" / f"ckpt-{ep_ref[1]['updates']:06d}.pt").unlink()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    marked = [json.dumps({**r, "test_acc": -1.0}) if r.get("epoch") == 2 and "event" not in r else json.dumps(r)
              for r in map(json.loads, lines)]
    assert marked != [json.dumps(json.loads(x)) for x in lines]
    (out / "metrics.jsonl").write_text("\n".join(marked) + "\n")

    resumed = jobs(launch_horovod(*one, "--", *args, "--out", str(out), "--resume", str(out)),
                   tmp_path / "resume.log")
    assert resumed.wait(timeout=300) == 0, resumed.output()[-6000:]
    ep_ref, ev_ref = read_metrics(ref)
    ep_out, ev_out = read_metrics(out)
    assert len(ep_out) == 5 and comparable(ep_out) == comparable(ep_ref)
    growth = lambda evs: [e for e in evs if e["event"] == "growth"]  # noqa: E731
    assert growth(ev_out) == growth(ev_ref) and growth(ev_ref), "the batch must have grown"
    check_every_sample_once(out)
    s_ref, s_out = (json.loads((d / "summary.json").read_text()) for d in (ref, out))
    for key in ("updates", "samples_seen", "final_batch", "final_lr", "final_test_acc", "growths"):
        assert s_out[key] == s_ref[key], key
    record("horovod: SIGKILL whole job (1 worker), --resume", result="resumed run == uninterrupted run",
           epochs_before_kill=epochs_before, samples_lost=0, stall_s=None,
           rolled_back_updates=rollback_report(out, 5 * EPOCH_UPDATES)["rolled_back_updates"])


def test_killed_worker_wrapper_run_finishes_and_is_reported_as_finished(tmp_path, jobs):
    """QA: a worker's `sh -c` wrapper (the process horovodrun started, not its Python) killed
    mid-run. The Python worker goes on and finishes the run (summary.json, final checkpoint);
    horovodrun then exits 1 with a traceback about the wrapper's exit 137. The launcher used to
    pass that on as a failure with `--resume` advice that the finished run refuses. It must say
    the run finished, where, and that horovodrun exited 1; exit 0; horovodrun's traceback kept
    in OUT/elastic/horovodrun-error.txt rather than printed."""
    out = tmp_path / "run"
    epochs = 3
    gates = holds(out, f"hold-{KILL_AT}")
    job = jobs(launch_horovod("--min-np", "1", "--max-np", "1", "--", *SGD2, "--epochs", str(epochs),
                              "--checkpoint-every", "1", "--out", str(out)), tmp_path / "job.log")
    worker = wait_until(f"update {KILL_AT}", held_worker(out, KILL_AT, rank=0, world_size=1), job)
    wrapper = psutil.Process(worker).parent()
    assert wrapper.name() == "sh" and wrapper.cmdline()[:2] == ["/bin/sh", "-c"], wrapper.cmdline()[:2]
    wrapper.send_signal(signal.SIGKILL)
    for gate in gates.glob("hold-*"):
        gate.unlink()
    code = job.wait(timeout=180)
    text = job.output()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == epochs and summary["updates"] == epochs * EPOCH_UPDATES, text[-4000:]
    assert (out / "checkpoints" / f"ckpt-{epochs * EPOCH_UPDATES:06d}.pt").exists()
    last_line = [ln for ln in text.splitlines() if ln.strip()][-1]
    assert code == 0, text[-4000:]
    assert last_line.startswith(f"Warning: the run finished all {epochs} epochs; its results are in {out}"), last_line
    report = out / "elastic" / "horovodrun-error.txt"
    assert "horovodrun exited 1" in last_line and str(report) in last_line, last_line
    assert "Traceback" not in text and "Traceback" in report.read_text(), text[-4000:]
    assert "--resume" not in text


def test_sigterm_to_the_launcher_stops_the_whole_job(tmp_path, jobs):
    """QA: `timeout` or `kill` sends SIGTERM to `hvd-abs launch horovod` alone. Python's default
    would end the launcher and leave horovodrun, its workers and the standbys training unseen (a
    later --resume then ran beside them). Now every process of the job is gone, the launcher says
    how to continue, and exits 128 + 15."""
    out = tmp_path / "run"
    gates = holds(out, "hold-1-world-2", f"hold-{KILL_AT}")  # held mid-run, 2 workers and a standby up
    job = jobs(launch_horovod("--min-np", "1", "--max-np", "2", "--warm", "1", "--", *SGD2, "--epochs", "4",
                              "--out", str(out)), tmp_path / "job.log")
    wait_until(f"update {KILL_AT} on 2 workers", held_worker(out, KILL_AT, 1), job)
    tree = psutil.Process(job.proc.pid).children(recursive=True)
    assert any("hvd_abs.launch.standby" in " ".join(p.cmdline()) for p in tree if alive(p.pid))
    job.proc.send_signal(signal.SIGTERM)
    assert job.wait(timeout=60) == 128 + signal.SIGTERM, job.output()[-4000:]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and [p for p in tree if alive(p.pid)]:
        time.sleep(0.1)
    assert not [p.pid for p in tree if alive(p.pid)], [p.cmdline()[:4] for p in tree if alive(p.pid)]
    assert f"SIGTERM received: the job was stopped (its workers and standbys too); continue it with -- --resume " \
           f"{out}" in job.output()
    for gate in gates.glob("hold-*"):
        gate.unlink()


def test_rank0_killed_while_a_worker_joins_stops_instead_of_restarting_the_run(tmp_path, jobs):
    """QA: rank 0 killed while it was sending the state to a joining worker. The joiner, alone and
    now rank 0, broadcast its own freshly built state: the run silently restarted from update 0
    into the same metrics. The sync now takes the state from a worker that holds it; with none
    left, every survivor stops with one line saying to resume from the newest checkpoint."""
    out, hostfile = tmp_path / "run", tmp_path / "hosts"
    hostfile.write_text(TWO_HOSTS)  # the joiner on another host name: it survives rank 0's failure
    gates = holds(out, "hold-sync", "hold-1-world-2")  # held until the join, so the run cannot end first
    job = jobs(launch_horovod("--min-np", "1", "--max-np", "2", "--hostfile", str(hostfile), "--", *SGD2,
                              "--epochs", "4", "--out", str(out)), tmp_path / "job.log")
    syncing = out / "ledger" / "syncing"
    victim = wait_until("rank 0 about to send the state to the joiner",
                        lambda: syncing.exists() and syncing.read_text().strip(), job)
    os.kill(int(victim), signal.SIGKILL)
    for gate in gates.glob("hold-*"):
        gate.unlink()
    code = job.wait(timeout=180)
    text = job.output()
    assert code != 0 and not (out / "summary.json").exists(), text[-4000:]
    assert f"the state in memory is lost (the survivors hold only a fresh start): continue the run from its " \
           f"newest checkpoint with --resume {out}" in text, text[-4000:]
    # Nothing was trained from the fresh start: every update in the ledger is rank 0's, before the join.
    assert {r["pid"] for r in ledger(out)} == {int(victim)}
