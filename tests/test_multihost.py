"""Elastic jobs across hosts: network namespaces on this machine, each with its own address, its
own sshd and its own disk (/srv/hvd), made by scripts/local_cluster.sh as users make one. The
launcher runs on host 1 over ssh, as a user's would; nothing is shared between the hosts but the
read-only image (this checkout and its .venv). Skipped where namespaces cannot be made (not root)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import BIN
from hvd_abs.metrics import read_metrics
from namespace_cluster import DIGITS, GLOO_TIMEOUT_ENV, Cluster, Job, hosts, merged_ledger


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with hosts(tmp_path_factory, "cluster") as c:
        yield c


def launch(cluster: Cluster, hostfile: Path, *train_args: str, launcher: list[str] = ()) -> list[str]:
    return [str(BIN / "hvd-abs"), "launch", "horovod", "--hostfile", str(hostfile), *cluster.ssh_flags,
            *launcher, "--", *train_args]


@pytest.mark.multiprocess
def test_the_batch_grows_onto_a_second_host(cluster):
    """Launcher and rank 0 on host 1, the pool hosts 1 and 2 (by address): the job starts on
    host 1 alone, its batch doubles after epoch 2, and host 2's worker joins over ssh (the
    rendezvous on the routable interface, the world-size request through the job channel),
    warm: into a standby the launcher started there ahead of the growth. The job finishes on
    the one-process schedule, and the standby's folder on host 2 is gone."""
    out = "/srv/hvd/grow"
    (cluster.disk(1) / "grow" / "ledger").mkdir(parents=True)
    (cluster.disk(1) / "grow" / "ledger" / "hold-95-world-2").touch()  # the join comes before the end
    args = [*DIGITS, "--method", "absa", "--epochs", "4", "--batch", "32", "--max-batch", "64", "--duration", "1"]
    done = cluster.run(1, launch(cluster, cluster.hostfile([1, 2]), *args, "--out", out,
                                 launcher=["--min-np", "1", "--max-np", "2"]), timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-6000:]
    assert "--network-interface eth0" in done.stderr  # found from the pool, not given
    epochs, events = read_metrics(cluster.disk(1) / "grow")
    assert [e["global_batch"] for e in epochs] == [32, 32, 64, 64]
    assert [e["world_size"] for e in epochs][-1] == 2
    # Host 2's worker ran (its own ledger on its own disk) and trained samples of the job.
    remote = [json.loads(line) for f in (cluster.disk(2) / "grow" / "ledger").glob("rank-*.jsonl")
              for line in f.read_text().splitlines()]
    assert remote and {r["world_size"] for r in remote} == {2} and all(r["ids"] for r in remote)
    assert not (cluster.disk(2) / "grow" / "metrics.jsonl").exists()  # rank 0's outputs: host 1
    host2 = cluster.addresses[1]
    assert f"a slot on host {host2} went to a warm standby" in done.stderr, done.stderr[-6000:]
    resizes = [e for e in events if e["event"] == "resize"]
    assert len(resizes) == 1 and resizes[0]["stall_s"] is not None
    remote_dir = done.stderr.split("--remote-dir ", 1)[1].split()[0]
    assert not Path(remote_dir).exists()  # (/tmp: the one folder the hosts share here)


@pytest.mark.multiprocess
def test_a_host_the_job_cannot_use_is_one_line_naming_it(cluster):
    """Before anything starts, each remote host is checked over ssh: a data folder missing
    there is one line naming the host and the fix, exit 2; so is a host nothing answers on."""
    (cluster.disk(1) / "data").mkdir(exist_ok=True)  # only host 1 has the data folder
    args = [*DIGITS, "--method", "sgd", "--epochs", "1", "--data-dir", "/srv/hvd/data", "--out", "/srv/hvd/bad"]
    done = cluster.run(1, launch(cluster, cluster.hostfile([1, 2], "pool12"), *args), timeout=120)
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"Error: host {cluster.addresses[1]}: no data folder /srv/hvd/data there"), last
    assert "Traceback" not in done.stderr
    assert not (cluster.disk(1) / "bad").exists()  # nothing started

    dead = cluster.root / "pool-dead"
    dead.write_text(f"{cluster.addresses[0]} slots=1\n10.231.254.77 slots=1\n")  # an address no host has
    done = cluster.run(1, launch(cluster, dead, *args, launcher=["--start-timeout", "5"]), timeout=120)
    assert done.returncode == 2, done.stderr
    assert "host 10.231.254.77:" in done.stderr.strip().splitlines()[-1], done.stderr


@pytest.mark.multiprocess
def test_a_host_without_the_environment_or_the_interface_is_one_line_naming_it(cluster):
    """The launcher's Python is at a path only host 1 has (a venv on its own disk), then an
    interface only host 1 has: each is one line naming host 2 and the fix, exit 2, before
    anything starts."""
    env = cluster.disk(1) / "env"
    (env / "bin").mkdir(parents=True)
    (env / "bin" / "python").symlink_to(Path(sys.executable).resolve())
    (env / "lib").symlink_to(Path(sys.prefix) / "lib")
    shutil.copy(Path(sys.prefix) / "pyvenv.cfg", env / "pyvenv.cfg")
    args = [*DIGITS, "--method", "sgd", "--epochs", "1", "--out", "/srv/hvd/noenv"]
    pool = cluster.hostfile([1, 2], "pool-env")
    done = cluster.run(1, ["/srv/hvd/env/bin/python", "-m", "hvd_abs", *launch(cluster, pool, *args)[1:]],
                       timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == (
        f"Error: host {cluster.addresses[1]}: no /srv/hvd/env/bin/python there; install the same environment at "
        f"the same path on every host (workers run the launcher's Python)"), done.stderr[-3000:]

    ns = cluster.namespaces[0]
    # (a veth pair inside host 1: the kernel here has no dummy interfaces)
    subprocess.run(["ip", "-n", ns, "link", "add", "only1", "type", "veth", "peer", "name", "only1p"], check=True)
    subprocess.run(["ip", "-n", ns, "addr", "add", "10.231.253.1/32", "dev", "only1"], check=True)
    subprocess.run(["ip", "-n", ns, "link", "set", "only1", "up"], check=True)
    try:
        done = cluster.run(1, launch(cluster, pool, *args, launcher=["--network-interface", "only1"]), timeout=120)
    finally:
        subprocess.run(["ip", "-n", ns, "link", "del", "only1"], check=False)
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"Error: host {cluster.addresses[1]}: no IPv4 address on interface only1 there"), last
    assert "pass the --network-interface every host shares" in last and "Traceback" not in done.stderr
    assert not (cluster.disk(1) / "noenv").exists()


def test_the_interface_is_found_from_the_pool(cluster):
    """From host 1, a pool naming host 2 runs Horovod's launcher through hvd_abs.launch.horovodrun
    on eth0 (the interface routing to host 2) with the ssh options; `lo` with a remote host is
    refused in one line. (--dry-run: nothing starts.)"""
    args = ["--dataset", "digits", "--out", "/srv/hvd/dry"]
    done = cluster.run(1, launch(cluster, cluster.hostfile([1, 2], "pool-dry"), *args, launcher=["--dry-run"]),
                       timeout=60)
    assert done.returncode == 0, done.stderr
    printed = done.stderr.splitlines()[-1]
    assert "-m hvd_abs.launch.horovodrun --ssh-option=UserKnownHostsFile=" in printed, printed
    assert "--network-interface eth0" in printed and "--ssh-identity-file" in printed, printed
    done = cluster.run(1, launch(cluster, cluster.root / "pool-dry", *args,
                                 launcher=["--dry-run", "--network-interface", "lo"]), timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (f"Error: --network-interface lo cannot reach "
                                                    f"{cluster.addresses[1]}: drop it (the interface is found "
                                                    f"from the hostfile) or name one every host has")


@pytest.mark.multiprocess
def test_a_host_leaving_the_hostfile_shrinks_the_job(cluster):
    """Hosts 1 and 2 with the pool [1, 2]; once host 2's worker has run update 30, the user
    takes host 2 out of the hostfile: Horovod stops its worker, the job goes on alone on host 1
    (accumulating to keep the global batch) with a resize event, and every sample of the
    committed history is trained once."""
    from test_faults_horovod import COMMIT_EVERY, SGD2, rollback_report

    out, run = "/srv/hvd/leave", cluster.disk(1) / "leave"
    (run / "ledger").mkdir(parents=True)
    for gate in ("hold-1-world-2", "hold-30"):
        (run / "ledger" / gate).touch()
    hostfile = cluster.hostfile([1, 2], "pool-leave")
    job = Job(cluster, launch(cluster, hostfile, *SGD2, "--epochs", "4", "--out", out,
                              launcher=["--min-np", "1", "--max-np", "2"]), "leave")
    remote = cluster.disk(2) / "leave" / "ledger"
    job.wait_for(remote, '"update": 30')
    hostfile.write_text(f"{cluster.addresses[0]} slots=1\n")  # host 2 leaves the pool
    # Horovod's discovery polls every second and tells the workers, which act at the next
    # commit: rank 0 stays held until the news has certainly reached it.
    import time

    time.sleep(4)
    (run / "ledger" / "hold-30").unlink()
    code = job.finish()
    assert code == 0, job.output()
    epochs, events = read_metrics(run)
    assert [e["epoch"] for e in epochs] == [1, 2, 3, 4] and epochs[-1]["world_size"] == 1, job.output()
    assert epochs[-1]["global_batch"] == 64 and epochs[-1]["accum_steps"] == 2
    shrinks = [e for e in events if e["event"] in ("resize", "failure") and e["world_size"] == 1]
    assert shrinks and all(e["stall_s"] is not None for e in shrinks), events
    merged_ledger(run / "ledger", remote)
    rollback_report(run, COMMIT_EVERY)  # (no sample lost; repeats only inside a rolled-back window)


@pytest.mark.multiprocess
def test_a_run_on_another_host_resumes_from_the_launchers_out(cluster):
    """The launcher on host 1, the only worker on host 2: the run's files are in host 1's OUT;
    `--resume OUT --epochs 3` from there continues it (host 2 fetches the newest checkpoint)
    to the same table a 3-epoch run has, and host 2's disk holds no output."""
    args = [*DIGITS, "--method", "sgd", "--batch", "32"]
    pool = cluster.hostfile([2], "pool2")
    out = "/srv/hvd/resumed"
    done = cluster.run(1, launch(cluster, pool, *args, "--epochs", "2", "--logger", "csv", "--out", out),
                       timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    done = cluster.run(1, launch(cluster, pool, "--resume", out, "--epochs", "3"), timeout=300)  # (--logger kept)
    assert done.returncode == 0, done.stderr[-4000:]
    # The table is the launcher's, from its OUT (host 2, rank 0, has no metrics file to read).
    assert f"metrics: {out}/metrics.jsonl" in done.stdout and "Error" not in done.stderr, done.stderr[-4000:]
    whole = "/srv/hvd/whole"
    done = cluster.run(1, launch(cluster, pool, *args, "--epochs", "3", "--out", whole), timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    timing = ("epoch_s", "samples_per_s", "second_order_s")
    table = [[{k: v for k, v in e.items() if k not in timing} for e in read_metrics(cluster.disk(1) / name)[0]]
             for name in ("resumed", "whole")]
    assert [e["epoch"] for e in table[0]] == [1, 2, 3] and table[0] == table[1]
    csv_epochs = (cluster.disk(1) / "resumed" / "metrics.csv").read_text().splitlines()[1:]  # the launcher's copy
    assert [int(line.split(",")[0]) for line in csv_epochs] == [1, 2, 3]
    resumed_from = json.loads((cluster.disk(1) / "resumed" / "summary.json").read_text())["resumed_from"]
    assert resumed_from == f"{out}/checkpoints/ckpt-{table[0][1]['updates']:06d}.pt"  # the launcher's file
    assert not (cluster.disk(2) / "resumed").exists() or {p.name for p in (cluster.disk(2) / "resumed").iterdir()} <= {"ledger"}


def _records(ledger: Path) -> list[dict]:
    return [json.loads(line) for f in ledger.glob("rank-*.jsonl") for line in f.read_text().splitlines()
            if line.endswith("}")]


@pytest.mark.multiprocess
def test_a_host_cut_off_is_barred_and_rejoins_after_the_cooldown(cluster):
    """Hosts 1 (launcher, rank 0) and 2: once host 2's worker waits inside update 31, host 2's
    link goes down. Rank 0's allreduce times out, host 2's ssh session ends on its keep-alives,
    Horovod bars host 2, and the job rolls back to update 24 and goes on alone. The link comes
    back; after the cooldown host 2 gets a worker again and the job ends at world size 2: every
    sample of the committed history once, the failure and the rejoin in host 1's metrics."""
    import time

    from test_faults_horovod import COMMIT_EVERY, SGD2, rollback_report

    out, run = "/srv/hvd/cut", cluster.disk(1) / "cut"
    (run / "ledger").mkdir(parents=True)
    for gate in ("hold-1-world-2", "hold-30", "hold-70-world-2"):  # (the rejoin comes before the end)
        (run / "ledger" / gate).touch()
    job = Job(cluster, launch(cluster, cluster.hostfile([1, 2], "pool-cut"), *SGD2, "--epochs", "4", "--out", out,
                              launcher=["--min-np", "1", "--max-np", "2", "--blacklist-cooldown", "5,6"]), "cut",
              env=GLOO_TIMEOUT_ENV)
    remote = cluster.disk(2) / "cut" / "ledger"
    job.wait_for(remote, '"update": 30')
    time.sleep(0.5)  # inside update 31's allreduce, waiting for rank 0
    cluster.cut(2)
    (run / "ledger" / "hold-30").unlink()
    deadline = time.monotonic() + 120
    while not any(r["update"] > 24 and r["world_size"] == 1 for r in _records(run / "ledger")):
        assert job.proc.poll() is None and time.monotonic() < deadline, job.output()
        time.sleep(0.2)
    cluster.heal(2)  # the job runs alone meanwhile
    assert job.finish() == 0, job.output()
    epochs, events = read_metrics(run)
    assert [e["epoch"] for e in epochs] == [1, 2, 3, 4] and epochs[-1]["world_size"] == 2, job.output()
    failure = next(i for i, e in enumerate(events) if e["event"] == "failure")
    assert events[failure]["world_size"] == 1 and events[failure]["stall_s"] is not None, events
    assert any(e["event"] == "resize" and e["world_size"] == 2 for e in events[failure:]), events
    assert any(r["update"] > 70 for r in _records(remote))  # host 2 trained again after the rejoin
    merged_ledger(run / "ledger", remote)
    report = rollback_report(run, COMMIT_EVERY)
    assert report["rolled_back_updates"][:6] == list(range(25, 31)), report


@pytest.mark.multiprocess
def test_rank_0s_host_dies_and_the_outputs_are_whole_on_the_launchers_host(cluster):
    """The launcher on host 1, the pool [2, 1]: rank 0 runs on host 2 and sends the run's
    outputs to host 1. Once host 1's worker waits inside update 31 (rank 0 is held after 30),
    every process on host 2 dies. Host 1's worker becomes rank 0, rolls back to update 24 and
    finishes: metrics.jsonl, checkpoints, summary and model.pt are in host 1's OUT, every epoch
    and growth line once, and host 2's disk holds no output (only its ledger). (Host 2 stays
    dead.)"""
    from test_faults_horovod import COMMIT_EVERY, SGD2, rollback_report

    out, run = "/srv/hvd/rank0", cluster.disk(1) / "rank0"
    gates = cluster.disk(2) / "rank0" / "ledger"
    gates.mkdir(parents=True)
    for gate in ("hold-1-world-2", "hold-30"):
        (gates / gate).touch()
    args = [*SGD2, "--epochs", "4", "--checkpoint-every", "1", "--out", out]
    job = Job(cluster, launch(cluster, cluster.hostfile([2, 1], "pool21"), *args,
                              launcher=["--min-np", "1", "--max-np", "2"]), "rank0")
    job.wait_for(run / "ledger", '"update": 30')
    import time

    time.sleep(0.5)  # inside update 31's allreduce, waiting for rank 0
    cluster.kill(2)
    code = job.finish()
    assert code == 0, job.output()
    epochs, events = read_metrics(run)
    assert [e["epoch"] for e in epochs] == [1, 2, 3, 4] and epochs[-1]["world_size"] == 1, job.output()
    checkpoints = [e["updates"] for e in events if e["event"] == "checkpoint"]
    assert len(checkpoints) == len(set(checkpoints)) and [e for e in events if e["event"] == "failure"], events
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 4 and summary["weights"] == f"{out}/model.pt" and (run / "plots.png").exists()
    assert (run / "model.pt").exists() and sorted(p.name for p in (run / "checkpoints").iterdir())
    left = {p.name for p in (cluster.disk(2) / "rank0").iterdir()}
    assert left == {"ledger"}, left  # rank 0 kept nothing on its own host
    merged_ledger(run / "ledger", gates)
    report = rollback_report(run, COMMIT_EVERY)
    assert report["rolled_back_updates"][:6] == list(range(25, 31)), report


@pytest.mark.multiprocess
def test_a_lost_host_rolls_the_job_back_and_it_finishes(cluster):
    """Hosts 1 (launcher, rank 0) and 3: once host 3's worker has run update 30 and waits inside
    update 31's allreduce (rank 0 is held after 30), every process on host 3 is SIGKILLed, its
    sshd too. The job rolls back to its last commit (update 24) and finishes alone on host 1:
    every sample of the committed history once, the rolled-back ones redone, the failure and its
    stall in host 1's metrics. (Run last: host 3 stays dead.)"""
    import time

    from test_faults_horovod import COMMIT_EVERY, SGD2, rollback_report

    out, run = "/srv/hvd/lost", cluster.disk(1) / "lost"
    (run / "ledger").mkdir(parents=True)
    for gate in ("hold-1-world-2", "hold-30"):
        (run / "ledger" / gate).touch()
    job = Job(cluster, launch(cluster, cluster.hostfile([1, 3], "pool13"), *SGD2, "--epochs", "4", "--out", out,
                              launcher=["--min-np", "1", "--max-np", "2"]), "lost")
    remote_ledger = cluster.disk(3) / "lost" / "ledger"
    job.wait_for(remote_ledger, '"update": 30')
    time.sleep(0.5)  # inside update 31's allreduce, waiting for rank 0
    cluster.kill(3)
    (run / "ledger" / "hold-30").unlink()
    code = job.finish()
    assert code == 0, job.output()
    epochs, events = read_metrics(run)
    assert [e["epoch"] for e in epochs] == [1, 2, 3, 4] and epochs[-1]["world_size"] == 1, job.output()
    failures = [e for e in events if e["event"] == "failure"]
    assert len(failures) == 1 and failures[0]["stall_s"] >= 0, events
    merged_ledger(run / "ledger", remote_ledger)  # one ledger of the whole job, on host 1's disk
    report = rollback_report(run, COMMIT_EVERY)
    assert report["rolled_back_updates"][:6] == list(range(25, 31)), report
