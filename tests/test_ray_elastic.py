"""Elastic Horovod on Ray (issue 6): discovery and CLI units, then real jobs on fake Ray nodes.

The multiprocess tests run on a `ray.cluster_utils.Cluster` of 1-CPU fake nodes held in a child
process (conftest.FakeRayCluster: nodes added and removed on command) or, for the dead-worker
rejoin, in tests/workers/ray_elastic_scenario.py with the toy elastic job of
tests/workers/ray_toy_job.py; every process has a timeout, so a hang never blocks pytest and the
cluster dies with the test. The real trainer (`hvd-abs launch ray`) grows onto an added node when
its batch grows, asks the autoscaler when it outgrows the cluster, and continues smaller when a
node is removed.
"""
from __future__ import annotations

import json
import sys

import pytest
from click.testing import CliRunner

from conftest import WORKERS, launch_ray, run_checked
from hvd_abs.cli import main as cli
from hvd_abs.launch import ray_executor
from hvd_abs.launch.ray_executor import (RayClusterDiscovery, RayElasticExecutor, RayExecutorError,
                                          _local_network, node_slots, target_world_size)
from hvd_abs.elastic.world_signal import signal_path, write_wanted
from hvd_abs.metrics import read_metrics
from test_elastic_horovod import check_every_sample_once, check_ranks_identical_after_sync
from test_faults_horovod import (COMMIT_EVERY, EPOCH_UPDATES, KILL_AT, SGD2, alive, held_worker, holds, ledger,
                                 rollback_report, wait_until)

# absa on digits, a worker per 32 samples: epoch 1 sets the eigenvalue reference, then the batch
# doubles at every epoch end (the --duration 1 fallback if not the eigenvalue): 32, 32, 64, 128, 128.
GROW = ["--dataset", "digits", "--model", "cnn", "--method", "absa", "--base-batch", "32", "--batch", "32",
        "--max-batch", "128", "--duration", "1", "--epochs", "5", "--eig-samples", "256", "--threads", "1",
        "--quiet", "--callback", "hvd_abs.testing.ledger:Ledger", "--commit-every", "4"]
GROWTH_AT = 88  # 2 epochs of 1437 training samples // 32: updates before the first doubling

# ---------------------------------------------------------------------------------------------
# Units: no Ray processes
# ---------------------------------------------------------------------------------------------


def _node(node_id: str, cpu: float = 1.0, gpu: float = 0.0, alive: bool = True) -> dict:
    res = {"CPU": cpu, "memory": 1e9, **({"GPU": gpu} if gpu else {})}
    return {"NodeID": node_id, "Alive": alive, "NodeManagerAddress": "10.0.0.1", "Resources": res}


def test_node_slots() -> None:
    assert node_slots({"CPU": 4.0}, 1, 0) == 4
    assert node_slots({"CPU": 0.3}, 0.1, 0) == 3  # not 2 from 0.3 / 0.1 = 2.9999999999999996
    assert node_slots({"CPU": 8.0, "GPU": 2.0}, 1, 1) == 2
    assert node_slots({"CPU": 8.0}, 1, 1) == 0  # a GPU worker does not fit a CPU node
    assert node_slots({"GPU": 4.0}, 0, 2) == 2
    with pytest.raises(ValueError, match="cpus_per_worker > 0 or gpus_per_worker > 0"):
        node_slots({"CPU": 1.0}, 0, 0)


def test_target_world_size() -> None:
    assert target_world_size(None, 1, 4) == 1  # nothing published: never more than asked
    assert target_world_size(3, 1, 4) == 3
    assert target_world_size(9, 1, 4) == 4
    assert target_world_size(1, 2, 4) == 2


def test_discovery_follows_cluster_and_wanted_size(tmp_path) -> None:
    nodes = [_node("a", cpu=2), _node("dead", alive=False), _node("tiny", cpu=0.5)]
    asks: list[list[dict]] = []
    d = RayClusterDiscovery(min_workers=1, max_workers=4, cpus_per_worker=1, run_dir=tmp_path,
                            nodes=lambda: nodes, request=asks.append)
    assert d.find_available_hosts_and_slots() == {"a": 1}  # no signal yet: min_workers
    write_wanted(tmp_path, 2)
    assert d.find_available_hosts_and_slots() == {"a": 2}
    nodes.insert(0, _node("b", cpu=1))  # a new node listed first still ranks after the old one
    write_wanted(tmp_path, 3)
    assert d.find_available_hosts_and_slots() == {"a": 2, "b": 1}
    assert asks == []  # the cluster holds what the job wants: nothing asked
    write_wanted(tmp_path, 9)
    assert d.find_available_hosts_and_slots() == {"a": 2, "b": 1}
    assert asks == [[{"CPU": 1.0}] * 4]  # capped at max_workers
    d.find_available_hosts_and_slots()
    assert len(asks) == 1  # polled every second: asked once per change
    write_wanted(tmp_path, 2)  # the standing request follows the wanted size down
    assert d.find_available_hosts_and_slots() == {"a": 2}
    assert asks[-1] == [{"CPU": 1.0}] * 2
    d.withdraw()
    assert asks[-1] == [] and d.requested is None
    signal_path(tmp_path).write_text("not json")  # malformed: min_workers, said once
    assert d.find_available_hosts_and_slots() == {"a": 1}


def test_discovery_without_run_dir_takes_max_and_gpu_bundles() -> None:
    asks: list[list[dict]] = []
    d = RayClusterDiscovery(min_workers=1, max_workers=3, cpus_per_worker=2, gpus_per_worker=1,
                            nodes=lambda: [_node("g", cpu=8, gpu=2), _node("c", cpu=8)], request=asks.append)
    assert d.find_available_hosts_and_slots() == {"g": 2}
    assert asks == [[{"CPU": 2.0, "GPU": 1.0}] * 3]


class FakeActors:
    """Stands in for Ray in WarmPool's unit test: actors are names, warm-ups finish on command."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.killed: list[str] = []
        self.finished: set[str] = set()
        self.failing: set[str] = set()

    def start(self, host: str) -> tuple[str, str]:
        name = f"{host}#{len(self.started)}"
        self.started.append(name)
        return name, name  # (actor, ready ref)

    def done(self, ref: str) -> bool:
        if ref in self.failing:
            raise RuntimeError("no module named torch")
        return ref in self.finished


def test_warm_pool_advertises_a_slot_once_its_actor_is_warm() -> None:
    ray_ = FakeActors()
    now = [0.0]
    pool = ray_executor.WarmPool(ray_.start, ray_.done, ray_.killed.append, cold_after_s=30, clock=lambda: now[0])
    assert pool({"a": 1}) == {}  # first slot: its actor is warming, nothing offered yet
    assert ray_.started == ["a#0"]
    ray_.finished.add("a#0")
    assert pool({"a": 1}) == {"a": 1}
    assert pool.take("a") == "a#0" and pool.take("a") is None  # the driver's worker takes it once
    assert pool({"a": 1, "b": 1}) == {"a": 1}  # growth: the running slot stays, b warms
    assert pool({"a": 1, "b": 1}) == {"a": 1} and ray_.started == ["a#0", "b#1"]  # one actor per slot
    now[0] = 31.0  # still warming after cold_after_s: offered anyway, its run queues behind the warm-up
    assert pool({"a": 1, "b": 1}) == {"a": 1, "b": 1}
    assert pool({"a": 1}) == {"a": 1} and ray_.killed == ["b#1"]  # b no longer wanted: its actor goes
    pool.close()
    assert pool.advertised == {}


def test_warm_pool_several_slots_on_one_host() -> None:
    ray_ = FakeActors()
    pool = ray_executor.WarmPool(ray_.start, ray_.done, ray_.killed.append)
    ray_.finished.add("h#0")
    assert pool({"h": 1}) == {} and pool({"h": 1}) == {"h": 1}
    assert pool.take("h") == "h#0"
    assert pool({"h": 3}) == {"h": 1} and ray_.started == ["h#0", "h#1", "h#2"]
    ray_.finished.add("h#1")
    assert pool({"h": 3}) == {"h": 2}
    # Polled again before the driver took h#1: h#1 is not counted twice, h#2 still warms.
    assert pool({"h": 3}) == {"h": 2} and len(ray_.started) == 3
    assert pool.take("h") == "h#1"  # the offered one, not the warming one
    assert pool({"h": 1}) == {"h": 1}  # shrink: h#2 keeps warming for a later growth
    ray_.finished.add("h#2")
    assert pool({"h": 2}) == {"h": 2} and len(ray_.started) == 3


def test_warm_pool_replaces_failed_warmups_then_goes_cold() -> None:
    ray_ = FakeActors()
    pool = ray_executor.WarmPool(ray_.start, ray_.done, ray_.killed.append, max_failures=2)
    ray_.failing.add("c#0")
    assert pool({"c": 1}) == {}
    assert pool({"c": 1}) == {} and ray_.killed == ["c#0"] and ray_.started == ["c#0", "c#1"]  # replaced
    assert not pool.cold
    ray_.failing.add("c#1")
    assert pool({"c": 1}) == {"c": 1} and pool.cold  # a second failure: offered cold from now on
    assert pool.take("c") is None  # no actor left: the driver starts a cold one
    assert pool({"c": 1, "d": 2}) == {"c": 1, "d": 2}


@pytest.mark.parametrize("kwargs, match", [
    ({"min_workers": 0}, "min_workers must be an integer >= 1"),
    ({"min_workers": 3, "max_workers": 2}, r"max_workers \(2\) must be at least min_workers \(3\)"),
    ({"cpus_per_worker": 0}, "not both 0"),
    ({"cooldown_range": (0, 5)}, "1 <= MIN <= MAX"),
    ({"env": {"HOROVOD_RANK": "1"}}, "no HOROVOD_"),
    ({"warm_timeout": -1}, "warm_timeout must be >= 0"),
])
def test_executor_rejects_bad_parameters(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RayElasticExecutor(**kwargs)


@pytest.mark.parametrize("argv, message", [
    (["--address", "nowhere", "--", "--out", "x"], "--address must be auto, local or HOST:PORT"),
    (["--address", "10.0.0.1:70000", "--", "--out", "x"], "--address must be auto, local or HOST:PORT"),
    (["--address", "ray://head:10001", "--", "--out", "x"], "Ray Client"),
    (["--address", "auto", "--", "--dataset", "digits", "--out", ""], "pass --out DIR"),
    (["--address", "auto", "--min-workers", "3", "--max-workers", "2", "--", "--out", "x"], "at least --min-workers"),
    (["--address", "auto", "--cpus-per-worker", "0", "--", "--out", "x"], "--cpus-per-worker > 0"),
    (["--address", "auto", "--gpus-per-worker", "-1", "--", "--out", "x"], "-1"),
])
def test_launch_ray_usage_errors(argv: list[str], message: str) -> None:
    result = CliRunner().invoke(cli, ["launch", "ray", *argv])
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_a_local_ray_runs_its_workers_at_the_launchers_priority(monkeypatch) -> None:
    """--address local starts Ray here: its workers (the training) are not niced to Ray's 15."""
    import os

    import ray

    seen = {}

    def init(address, **kwargs):
        seen[address] = os.environ.get("RAY_worker_niceness")
        raise RuntimeError("no cluster in this unit test")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    for address in ("local", "127.0.0.1:6379"):
        monkeypatch.delenv("RAY_worker_niceness", raising=False)
        with pytest.raises(RuntimeError, match="no cluster"):
            RayElasticExecutor(address=address).start()
    assert seen == {"local": "0", "127.0.0.1:6379": None}  # another's cluster keeps its own setting


def test_network_choice() -> None:
    assert _local_network("127.0.0.1") == ("lo", "127.0.0.1")  # a cluster on loopback
    with pytest.raises(RayExecutorError, match="pass nic=NAME"):
        _local_network("203.0.113.77")  # no local interface holds it


def test_launch_ray_builds_train_elastic_with_absolute_out(tmp_path, monkeypatch) -> None:
    seen: dict = {}

    class Recorder:  # stands in for the executor: this test is about the command line only
        driver_address, spans_machines = "127.0.0.1", False

        def __init__(self, **kwargs: object) -> None:
            seen["kwargs"] = kwargs
            self.env: dict = {}

        def start(self) -> None: ...

        def run(self, fn: object, args: tuple, *, warmup: object) -> list:
            seen["fn"], seen["args"], seen["warmup"], seen["env"] = fn, args, warmup, dict(self.env)
            return []

        def shutdown(self) -> None:
            seen["shutdown"] = True

    monkeypatch.setattr(ray_executor, "RayElasticExecutor", Recorder)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["launch", "ray", "--address", "local", "--max-workers", "2", "--",
                                      "--dataset", "digits", "--out=runs/x"])
    assert result.exit_code == 0, result.output
    out = str(tmp_path / "runs" / "x")
    assert seen["fn"] is ray_executor.train_worker and seen["shutdown"]
    assert seen["args"] == (["--elastic", "--max-np", "2", "--dataset", "digits", f"--out={out}"],)
    # Workers warm up (imports, data) on the same command line before their slot is offered.
    assert seen["warmup"].func is ray_executor.warm_train_worker and seen["warmup"].args == seen["args"]
    # The workers reach the launcher's job service (its address on the driver's, a per-job key).
    assert seen["env"]["HVD_ABS_JOB_SERVICE"].startswith("127.0.0.1:") and len(seen["env"]["HVD_ABS_JOB_KEY"]) == 64
    assert seen["kwargs"]["warm_timeout"] == 60.0
    result = CliRunner().invoke(cli, ["launch", "ray", "--address", "local", "--warm-timeout", "5", "--", "--out=runs/x"])
    assert result.exit_code == 0 and seen["kwargs"]["warm_timeout"] == 5.0, result.output
    result = CliRunner().invoke(cli, ["launch", "ray", "--address", "local", "--cold", "--", "--out=runs/x"])
    assert result.exit_code == 0, result.output
    assert seen["warmup"] is None
    assert seen["kwargs"]["run_dir"] == out and seen["kwargs"]["address"] == "local"


# ---------------------------------------------------------------------------------------------
# Real Ray: fake nodes; the real trainer, and the toy elastic job
# ---------------------------------------------------------------------------------------------


def _scenario(name: str) -> dict:
    proc = run_checked([sys.executable, str(WORKERS / "ray_elastic_scenario.py"), name], timeout=300,
                       env={"RAY_DEDUP_LOGS": "0"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT ")]
    assert lines, f"no report\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    report = json.loads(lines[-1][len("REPORT "):])
    assert "error" not in report, f"{report['error']}\nstderr:\n{proc.stderr}"
    return report


def _check_no_step_lost(report: dict, steps: int) -> list[int]:
    """Every worker ends with the same ledger holding each step once; returns its world sizes."""
    results = report["results"]
    # Times are each worker's own clock; steps and world sizes must agree.
    ledgers = [{k: r["ledger"][k] for k in ("step", "steps", "sizes")} for r in results]
    assert all(led == ledgers[0] for led in ledgers), "workers ended with different states"
    assert ledgers[0]["steps"] == list(range(steps)), "a committed step was lost or repeated"
    return ledgers[0]["sizes"]


@pytest.mark.multiprocess
def test_trainer_grows_onto_an_added_node_and_asks_the_autoscaler(tmp_path, jobs, fake_ray):
    cluster = fake_ray(1)
    out = tmp_path / "run"
    # Epochs 1-2 (updates 1-88, batch 32) want 1 worker; a node joins at update 3. The batch then
    # doubles (64: 2 workers, updates 89-110) and doubles again (128: 4 wanted, capped at 3, with
    # room for 2: the executor asks the autoscaler for 3 workers; held at update 115 to look).
    # The joiner warms up (imports, data) before its slot is offered, the job accumulating on 1
    # worker meanwhile: held at update 95 until it has joined, so a fast machine cannot finish first.
    gates = holds(out, "hold-3", "hold-95-world-2", "hold-115")
    job = jobs(launch_ray(cluster.address, "--max-workers", "3", "--", *GROW, "--out", str(out)), tmp_path / "job.log")
    wait_until("update 3", lambda: any(r["update"] == 3 for r in ledger(out)), job)
    cluster.add_node()
    (gates / "hold-3").unlink()
    wait_until("update 115", lambda: any(r["update"] == 115 for r in ledger(out)), job)
    requests = wait_until("an autoscaler request", cluster.autoscaler_request, job, timeout=30)
    (gates / "hold-115").unlink()
    assert job.wait(timeout=300) == 0, job.output()[-6000:]

    assert requests == [[{"CPU": 1.0}, 3]]
    assert cluster.autoscaler_request() == []  # withdrawn when the job ended
    epochs, events = read_metrics(out)
    assert [e["global_batch"] for e in epochs] == [32, 32, 64, 128, 128]
    sizes = [e["world_size"] for e in epochs]
    assert sizes[0] == 1 and sizes[-1] == 2 and sizes == sorted(sizes), sizes
    # The added node stayed idle until the batch grew: no update before the growth ran on 2.
    assert min(r["update"] for r in ledger(out) if r["world_size"] == 2) > GROWTH_AT
    assert [e["world_size"] for e in events if e["event"] == "resize"] == [2]
    check_every_sample_once(out)
    assert check_ranks_identical_after_sync(out) >= 1  # the joiner's sync: equal to rank 0
    # The workers' lines reach the log (not a terminal) without colour codes.
    # The run's table is the launcher's, from its OUT (rank 0 sends the outputs there).
    assert "workers: 1 (epoch" in job.output() and "\x1b[" not in job.output(), job.output()[-3000:]


@pytest.mark.multiprocess
def test_trainer_continues_smaller_when_a_node_is_removed(tmp_path, jobs, fake_ray):
    cluster = fake_ray(2)
    out = tmp_path / "run"
    gates = holds(out, "hold-1-world-2", f"hold-{KILL_AT}")  # 2 workers from update 1; stop at KILL_AT
    job = jobs(launch_ray(cluster.address, "--max-workers", "2", "--", *SGD2, "--epochs", "4", "--out", str(out)),
               tmp_path / "job.log")
    # Both ranks' pids: either may be on the node removed, and rank 1's row can trail rank 0's.
    held = {wait_until(f"rank {r} at update {KILL_AT} on 2 workers", held_worker(out, KILL_AT, r), job) for r in (0, 1)}
    cluster.remove_node()  # its raylet and the worker actor on it die
    # Let go only once that worker is gone: the actor outlives its raylet by up to a second or so,
    # and let go sooner it would run updates past KILL_AT (and their commit) with the survivor.
    wait_until("the removed node's worker to exit", lambda: any(not alive(pid) for pid in held), job, timeout=60)
    for gate in gates.glob("hold-*"):
        gate.unlink()
    assert job.wait(timeout=300) == 0, job.output()[-6000:]
    epochs, events = read_metrics(out)
    assert [e["epoch"] for e in epochs] == [1, 2, 3, 4] and epochs[-1]["world_size"] == 1
    failures = [e for e in events if e["event"] == "failure"]
    assert len(failures) == 1 and failures[0]["world_size"] == 1, events
    # Back to the last commit (update 24), updates 25-30 redone on 1 worker; nothing lost.
    report = rollback_report(out, COMMIT_EVERY)
    assert report["rolled_back_updates"][:6] == list(range(25, 31)), report
    check_every_sample_once(out)
    check_ranks_identical_after_sync(out)
    assert json.loads((out / "summary.json").read_text())["updates"] == 4 * EPOCH_UPDATES


@pytest.mark.multiprocess
def test_dead_worker_rolls_back_then_rejoins_after_cooldown() -> None:
    report = _scenario("crash")
    sizes = _check_no_step_lost(report, 80)
    assert sizes[:10] == [2] * 10
    first_one = sizes.index(1)
    assert first_one <= 12 and 2 in sizes[first_one:], sizes  # alone, then back to 2
    assert [k for k, _ in report["results"][0]["resets"]] == ["failure", "resize"]
    assert [r["rank"] for r in report["results"]] == [0, 1]
    # The failed node was barred for the cooldown (exactly 8 s, see the scenario): the first step
    # back on 2 workers (committed on this machine's clock, as the crash marker) came after it.
    back = first_one + sizes[first_one:].index(2)
    rejoined_after = report["results"][0]["ledger"]["times"][back] - report["crashed_at"]
    assert rejoined_after >= 8, rejoined_after


@pytest.mark.multiprocess
def test_a_script_runs_as_the_ray_workers(tmp_path, jobs, fake_ray):
    """`launch ray --script`: examples/custom_model.py (given relative to the launch directory,
    with its own --width option) in the worker actors of 2 fake nodes, sgd at 2 x 32."""
    cluster = fake_ray(2)
    out = tmp_path / "run"
    holds(out, "hold-1-world-2")  # both workers from update 1 (the second node's actor warms meanwhile)
    job = jobs(launch_ray(cluster.address, "--max-workers", "2", "--script", "examples/custom_model.py", "--",
                          "--method", "sgd", "--base-batch", "32", "--batch", "64", "--epochs", "2", "--threads", "1",
                          "--quiet", "--callback", "hvd_abs.testing.ledger:Ledger", "--width", "4", "--out", str(out)), tmp_path / "job.log")
    assert job.wait(timeout=240) == 0, job.output()[-6000:]
    epochs, _ = read_metrics(out)
    assert [(e["epoch"], e["world_size"]) for e in epochs] == [(1, 2), (2, 2)]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["model"], summary["dataset"], summary["updates"]) == ("SmallNet", "digits-custom", 2 * (1437 // 64))
    # Each worker shuts its Horovod down when done, before the actors are killed: no worker's
    # background loop reports its peer's connection reset after a successful job.
    assert "background loop uncaught exception" not in job.output(), job.output()[-3000:]
    check_every_sample_once(out)
    check_ranks_identical_after_sync(out)


def test_the_address_comes_from_RAY_ADDRESS_as_ray_init_reads_it(monkeypatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "nowhere")
    result = CliRunner().invoke(cli, ["launch", "ray", "--", "--out", "x"])
    assert result.exit_code == 2 and "--address must be auto, local or HOST:PORT" in result.output, result.output
    monkeypatch.delenv("RAY_ADDRESS")
    result = CliRunner().invoke(cli, ["launch", "ray", "--", "--out", "x"])
    assert result.exit_code == 2 and "Missing option '--address'" in result.output, result.output


def test_a_cluster_that_wants_a_token_is_one_line_naming_what_to_set(monkeypatch) -> None:
    from hvd_abs.launch.ray_address import auth_problem

    def failed_connect(cause: str) -> ConnectionError:
        try:
            try:
                raise RuntimeError(cause)
            except RuntimeError as exc:
                raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.1:6379") from exc
        except ConnectionError as exc:
            return exc

    denied = failed_connect("Failed to connect to GCS: Unauthenticated: InvalidAuthToken: token is missing")
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert auth_problem(denied, "10.0.0.1:6379") == (
        "the Ray cluster at 10.0.0.1:6379 requires token authentication (InvalidAuthToken): set RAY_AUTH_MODE=token, "
        "with the cluster's token in ~/.ray/auth_token, in a file named by RAY_AUTH_TOKEN_PATH or in RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", "/etc/ray-token")
    assert "refused this machine's token (InvalidAuthToken): give it the token of the cluster's head" in \
        auth_problem(denied, "10.0.0.1:6379") and "/etc/ray-token" in auth_problem(denied, "10.0.0.1:6379")
    assert auth_problem(failed_connect("Timed out while waiting for GCS"), "10.0.0.1:6379") is None
