"""Elastic training under real horovodrun (Gloo on 127.0.0.1): growth-driven scale-up, shrink,
bit-identical joins, and the sample ledger. Each test is one bounded horovodrun job."""
from __future__ import annotations

import json
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import pytest

from conftest import BIN, run_checked
from hvd_abs.metrics import read_metrics

DIGITS = ["--dataset", "digits", "--model", "cnn", "--base-batch", "32", "--quiet", "--callback", "hvd_abs.testing.ledger:Ledger", "--commit-every", "1"]


def ledger_records(out: Path) -> list[dict]:
    """Every whole line of every rank's ledger, with the writing process's pid (a line being
    written by a running job, or cut by a kill, is skipped)."""
    records = []
    for f in (out / "ledger").glob("rank-*.jsonl"):
        pid = int(f.stem.split("-")[1])
        for line in f.read_text().splitlines():
            try:
                records.append({**json.loads(line), "pid": pid})
            except json.JSONDecodeError:
                pass
    return records


def committed_ids(out: Path) -> dict[int, list[int]]:
    """Sample ids per epoch in the committed history: for every update number, the records of
    its latest attempt (earlier attempts of it were rolled back)."""
    records = ledger_records(out)
    latest: dict[int, int] = {}
    for r in records:
        latest[r["update"]] = max(latest.get(r["update"], 0), r["attempt"])
    assert sorted(latest) == list(range(1, max(latest) + 1)), "an update is missing from the ledger"
    per_epoch: dict[int, list[int]] = defaultdict(list)
    for r in records:
        if r["attempt"] == latest[r["update"]]:
            per_epoch[r["epoch"]].extend(r["ids"])
    return per_epoch


def check_every_sample_once(out: Path) -> None:
    epochs, _ = read_metrics(out)
    per_epoch = committed_ids(out)
    seen_before = 0
    for line in epochs:
        ids = per_epoch[line["epoch"] - 1]
        assert len(ids) == len(set(ids)), f"epoch {line['epoch']}: a sample was processed twice"
        assert len(ids) == line["samples_seen"] - seen_before, f"epoch {line['epoch']}: samples lost"
        seen_before = line["samples_seen"]


def check_epoch_lines_cover_their_epochs(out: Path) -> None:
    """Each epoch line holds the whole epoch, also when a resize's reset re-entered it: its time
    spans all of its updates (ledger times), its world size is that of its last update, and its
    throughput is not 0."""
    records = ledger_records(out)
    latest: dict[int, int] = {}
    for r in records:
        latest[r["update"]] = max(latest.get(r["update"], 0), r["attempt"])
    committed = [r for r in records if r["attempt"] == latest[r["update"]]]
    epochs, _ = read_metrics(out)
    for line in epochs:
        mine = [r for r in committed if r["epoch"] == line["epoch"] - 1]
        first = min(r["update"] for r in mine)
        span = max(r["t"] for r in mine) - min(r["t"] for r in mine if r["update"] == first)
        assert line["epoch_s"] >= span, (line["epoch"], line["epoch_s"], span)
        assert {r["world_size"] for r in mine if r["update"] == line["updates"]} == {line["world_size"]}, line
        assert line["samples_per_s"] > 0, line


def check_ranks_identical_after_sync(out: Path) -> int:
    """Every sync left all ranks with the same model + optimizer digest; returns the syncs seen
    by more than one rank."""
    by_attempt: dict[int, set[str]] = defaultdict(set)
    ranks: dict[int, int] = defaultdict(int)
    for f in (out / "ledger").glob("sync-*.jsonl"):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            by_attempt[r["attempt"]].add(r["digest"])
            ranks[r["attempt"]] += 1
    assert by_attempt and all(len(d) == 1 for d in by_attempt.values()), "ranks differ after a sync"
    return sum(1 for a in ranks if ranks[a] > 1)


def joined_warm(out: Path) -> bool:
    """The worker that joined as rank 1 ran in a claimed standby (a standby runs the worker in its
    own process, so its pid names both its claim file and its ledger). The first worker may also
    have found a standby ready: that claim is not the join's."""
    claimed = {int(p.name.split(".")[0]) for p in (out / "elastic" / "standby").glob("*.claimed.*")}
    joiners = {int(f.stem.split("-")[1]) for f in (out / "ledger").glob("rank-*.jsonl")
               if any(r["rank"] == 1 for r in map(json.loads, f.read_text().splitlines()))}
    return len(joiners) == 1 and joiners <= claimed


@pytest.mark.multiprocess
def test_growth_adds_a_warm_worker_and_follows_the_one_process_schedule(tmp_path):
    args = [*DIGITS, "--method", "absa", "--epochs", "10", "--batch", "32", "--max-batch", "128", "--duration", "1"]
    elastic, single = tmp_path / "elastic", tmp_path / "single"
    # The batch doubles after epoch 2 (update 88): held after update 95 until the second worker
    # has joined, so a fast machine cannot finish the run first.
    (elastic / "ledger").mkdir(parents=True)
    (elastic / "ledger" / "hold-95-world-2").touch()
    # --warm 1: the joining slot is handed to a pre-started, pre-imported standby.
    run_checked([str(BIN / "hvd-abs"), "launch", "horovod", "--min-np", "1", "--max-np", "2", "--warm", "1", "--",
                 *args, "--out", str(elastic)], timeout=300)
    run_checked([str(BIN / "hvd-abs"), "train", *args, "--out", str(single)], timeout=300)

    ep_e, ev_e = read_metrics(elastic)
    ep_s, _ = read_metrics(single)
    # The batch and LR schedule is the one-process schedule, update for update.
    sched = lambda eps: [(e["epoch"], e["updates"], e["global_batch"], round(e["lr"], 12), e["adv_ratio"]) for e in eps]
    assert sched(ep_e) == sched(ep_s)
    # Workers: 1 until the first doubling (after epoch 1), then 2 once the standby is warm (the
    # job goes on with accumulation meanwhile), never back.
    sizes = [e["world_size"] for e in ep_e]
    assert sizes[0] == 1 and sizes[-1] == 2 and sizes == sorted(sizes), sizes
    resizes = [e for e in ev_e if e["event"] == "resize"]
    assert len(resizes) == 1 and resizes[0]["world_size"] == 2 and resizes[0]["stall_s"] >= 0
    assert json.loads((elastic / "elastic" / "world_size.json").read_text())["world_size"] == 2
    check_every_sample_once(elastic)
    check_epoch_lines_cover_their_epochs(elastic)
    assert check_ranks_identical_after_sync(elastic) >= 1  # the join's sync: new worker == rank 0
    # The join went through a standby, and every standby left with the job.
    assert joined_warm(elastic)
    standby = elastic / "elastic" / "standby"
    assert not list(standby.glob("*.ready")) and not list(standby.glob("*.sock"))


@pytest.mark.multiprocess
def test_shrink_when_a_slot_leaves_the_pool(tmp_path, jobs):
    out, hostfile = tmp_path / "run", tmp_path / "hosts"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    # Pin both resizes to known updates however loaded the machine: after update 10 the job waits
    # (committing) until 2 workers run, after update 30 until 1 does.
    (out / "ledger").mkdir(parents=True)
    (out / "ledger" / "hold-10-world-2").touch()
    (out / "ledger" / "hold-30-world-1").touch()
    # sgd at global batch 64 = 2 x 32: the job wants 2 workers from the start.
    args = [*DIGITS, "--method", "sgd", "--epochs", "4", "--batch", "64", "--out", str(out)]
    job = jobs([str(BIN / "hvd-abs"), "launch", "horovod", "--min-np", "1", "--max-np", "2",
                "--hostfile", str(hostfile), "--", *args], tmp_path / "job.log")
    deadline = time.time() + 240
    while time.time() < deadline and job.proc.poll() is None:
        # Two workers ran an update past the first hold: take a slot out of the pool. (Taken out
        # sooner, the shrink could come before update 10, whose hold would then wait for a
        # second worker the pool no longer has.)
        if any(r["world_size"] == 2 and r["update"] > 10 for r in ledger_records(out)):
            hosts_tmp = hostfile.with_suffix(".tmp")  # whole or not at all: discovery polls it
            hosts_tmp.write_text("localhost slots=1\n")
            hosts_tmp.replace(hostfile)
            break
        time.sleep(0.2)
    assert job.wait(timeout=max(1.0, deadline - time.time())) == 0, job.output()[-6000:]
    epochs, events = read_metrics(out)
    assert len(epochs) == 4 and epochs[-1]["world_size"] == 1, [e["world_size"] for e in epochs]
    assert [e["world_size"] for e in events if e["event"] == "resize"] == [2, 1]
    check_every_sample_once(out)
    check_epoch_lines_cover_their_epochs(out)
    check_ranks_identical_after_sync(out)


@pytest.mark.multiprocess
def test_a_script_with_its_own_model_and_data_grows_in_place(tmp_path):
    """`launch horovod --script --warm 1`: examples/custom_model.py (its own model class, data and
    --width option) as the workers of an elastic job: the batch doubles after epoch 2 and a second
    worker joins through a standby that imported ahead (the job held after update 90 until it
    has), on the one-process schedule."""
    script = Path(__file__).resolve().parents[1] / "examples" / "custom_model.py"
    args = ["--method", "abs", "--base-batch", "32", "--batch", "32", "--max-batch", "64", "--duration", "1",
            "--epochs", "4", "--eig-samples", "256", "--threads", "1", "--quiet", "--width", "4"]
    elastic, single = tmp_path / "elastic", tmp_path / "single"
    (elastic / "ledger").mkdir(parents=True)
    (elastic / "ledger" / "hold-90-world-2").touch()
    run_checked([str(BIN / "hvd-abs"), "launch", "horovod", "--min-np", "1", "--max-np", "2", "--warm", "1",
                 "--script", str(script), "--", *args, "--callback", "hvd_abs.testing.ledger:Ledger", "--commit-every", "2", "--out", str(elastic)],
                timeout=300)
    run_checked([str(BIN / "python"), str(script), *args, "--out", str(single)], timeout=120)

    ep_e, ev_e = read_metrics(elastic)
    ep_s, _ = read_metrics(single)
    sched = lambda eps: [(e["epoch"], e["updates"], e["global_batch"], round(e["lr"], 12)) for e in eps]
    assert sched(ep_e) == sched(ep_s) and [e["global_batch"] for e in ep_e] == [32, 32, 64, 64]
    assert [e["world_size"] for e in ep_e] == [1, 1, 2, 2]
    assert [e["world_size"] for e in ev_e if e["event"] == "resize"] == [2]
    summary = json.loads((elastic / "summary.json").read_text())
    assert (summary["model"], summary["dataset"], summary["world_size"]) == ("SmallNet", "digits-custom", 2)
    assert [(r["event"], r["world_size"]) for r in summary["resets"]] == [("resize", 2)]  # as the table says
    check_every_sample_once(elastic)
    assert check_ranks_identical_after_sync(elastic) >= 1  # the joiner's sync: equal to rank 0
    assert joined_warm(elastic)


def test_the_launcher_refuses_to_resume_a_finished_run_as_train_does(tmp_path):
    """QA: `launch horovod -- --resume OUT` of a run that reached its --epochs retrained nothing
    but rewrote its summary (world size, commits), plots and weights, with exit 0; `hvd-abs
    train` refuses. The workers now refuse it too, before writing anything."""
    out = tmp_path / "run"
    run_checked([str(BIN / "hvd-abs"), "train", "--dataset", "digits", "--model", "cnn", "--method", "sgd",
                 "--epochs", "2", "--quiet", "--out", str(out)], timeout=120)
    before = {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()}
    proc = subprocess.run([str(BIN / "hvd-abs"), "launch", "horovod", "--max-np", "2", "--", "--resume", str(out),
                           "--quiet"], capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"--resume {out}: that run already reached epoch 2; pass --epochs above 2" in proc.stderr
    assert {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()} == before
