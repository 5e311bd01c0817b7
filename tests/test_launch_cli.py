"""`hvd-abs launch`, in one process: the train options a launcher owns, what it reports after
horovodrun (or the Ray executor) says the job failed, and how horovodrun's stderr is relayed.

The runs judged here are real `hvd-abs train` runs (digits, a few seconds), so summary.json and
the checkpoints are what training writes. tests/test_faults_horovod.py runs the same decision
under real horovodrun (a worker's `sh -c` wrapper killed, the job finishing anyway).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from hvd_abs.cli import main

QUICK = ["--dataset", "digits", "--model", "mlp", "--method", "sgd", "--base-batch", "64", "--train-subset", "256",
         "--test-subset", "128", "--threads", "1", "--quiet"]


def one_error_line(result) -> str:
    """The single `Error: ...` line of an exit-2 refusal (no traceback)."""
    text = result.output
    assert result.exit_code == 2 and "Traceback" not in text, text
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), text
    return lines[0]


@pytest.mark.parametrize("launcher, own, given", [
    (["launch", "horovod", "--max-np", "2", "--dry-run"], "--max-np", ["--max-np", "3"]),
    (["launch", "horovod", "--max-np", "2", "--dry-run"], "--max-np", ["--max-np=3"]),
    (["launch", "horovod", "--dry-run"], "--max-np", ["--elastic"]),
    # (No Ray head at 127.0.0.1:1: the refusal comes before any attempt to reach one.)
    (["launch", "ray", "--address", "127.0.0.1:1", "--max-workers", "2"], "--max-workers", ["--max-np", "3"]),
    (["launch", "ray", "--address", "127.0.0.1:1"], "--max-workers", ["--elastic"]),
])
def test_launch_refuses_train_options_it_sets_itself(tmp_path, launcher, own, given):
    """Both launchers put `--elastic --max-np N` on every worker's command line; the same option
    among the train options came after it and won (horovodrun --max-np 2, workers --max-np 3)."""
    out = tmp_path / "run"
    result = CliRunner().invoke(main, [*launcher, "--", "--epochs", "2", *given, "--out", str(out)])
    line = one_error_line(result)
    name = given[0].split("=")[0]
    assert line.startswith(f"Error: {name} among the train options") and "drop" in line, line
    if name == "--max-np":
        assert f"pass {own} N before `--`" in line, line
    assert not out.exists()  # refused before anything was written


def test_launch_keeps_train_options_that_only_look_like_its_own(tmp_path):
    """An option's value (here --data-dir's) is not an option: `hvd-abs train` reads it as a value."""
    result = CliRunner().invoke(main, ["launch", "horovod", "--max-np", "2", "--dry-run", "--", *QUICK,
                                       "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "train --elastic --max-np 2 --dataset digits" in result.output


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[Path, list[str], float]:
    """A real 2-epoch run with a checkpoint per epoch: (run dir, its train options, start time)."""
    out = tmp_path_factory.mktemp("launch") / "run"
    args = [*QUICK, "--epochs", "2", "--checkpoint-every", "1", "--out", str(out)]
    started = time.time()
    result = CliRunner().invoke(main, ["train", *args])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "summary.json").read_text())["epochs"] == 2
    return out, args, started


def test_launch_resume_continues_in_the_runs_own_folder(finished_run):
    """`launch ... -- --resume DIR` without --out: like `hvd-abs train`, the run continues in DIR,
    which the launcher and every worker are then told."""
    out, _, _ = finished_run
    result = CliRunner().invoke(main, ["launch", "horovod", "--dry-run", "--", "--resume", str(out), "--epochs", "3"])
    assert result.exit_code == 0, result.output
    assert f"--resume {out} --epochs 3 --out {out}" in result.output
    assert f"--run-dir {out} " in result.output  # the discovery script watches that folder too


def test_a_run_that_finished_is_not_reported_as_failed(finished_run):
    """horovodrun exited 1 (a worker's wrapper died) but the run wrote its final summary for all
    its epochs: exit 0 and a warning naming the results, not `--resume` advice (a resume of a
    finished run is refused: 'that run already reached epoch 2')."""
    from hvd_abs.launch.outcome import job_outcome

    out, args, started = finished_run
    code, line = job_outcome(args, "horovodrun exited 1", started, report=str(out / "elastic" / "x.txt"))
    assert code == 0, line
    assert line.startswith("Warning: the run finished all 2 epochs; its results are in " + str(out)), line
    assert "horovodrun exited 1" in line and str(out / "elastic" / "x.txt") in line and "--resume" not in line
    assert "\n" not in line
    # A --resume that gives no --epochs planned the run's own (2), not the default 90.
    code, line = job_outcome([*QUICK, "--resume", str(out), "--out", str(out)], "horovodrun exited 1", started)
    assert code == 0 and line.startswith("Warning: the run finished all 2 epochs"), line


@pytest.mark.multiprocess
def test_an_elastic_resume_into_another_folder_with_overwrite_replaces_its_run(finished_run, tmp_path):
    """`launch horovod -- --resume A --out B --overwrite` replaces B's run as `hvd-abs train` does.
    (The elastic path left B's old epochs and checkpoints there and appended A's last epoch.)"""
    from hvd_abs.metrics import read_metrics

    a, _, _ = finished_run
    b = tmp_path / "b"
    assert CliRunner().invoke(main, ["train", *QUICK, "--epochs", "1", "--seed", "5", "--out", str(b)]).exit_code == 0
    result = CliRunner().invoke(main, ["launch", "horovod", "--min-np", "1", "--max-np", "1", "--",
                                       *QUICK, "--resume", str(a), "--epochs", "3", "--out", str(b), "--overwrite"])
    assert result.exit_code == 0, result.output
    timing = {"epoch_s", "samples_per_s", "second_order_s"}
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    ours, theirs = read_metrics(b)[0], read_metrics(a)[0]
    assert [e["epoch"] for e in ours] == [1, 2, 3] and strip(ours[:2]) == strip(theirs)  # A's epochs, then one more
    assert sorted(p.name for p in (b / "checkpoints").glob("ckpt-*.pt")) == [f"ckpt-{ours[-1]['updates']:06d}.pt"]
    assert not (b / ".replaced-run").exists()


def test_a_run_that_did_not_finish_gets_resume_advice_only_with_a_checkpoint(finished_run, tmp_path):
    from hvd_abs.launch.outcome import job_outcome

    out, args, started = finished_run
    resume = f"rerun with --resume {out} among the train options"
    # More epochs planned than the summary holds (e.g. a --resume --epochs 3 that failed).
    code, line = job_outcome([*args, "--epochs", "3", "--resume", str(out)], "horovodrun exited 1", started)
    assert code == 1 and line.startswith("Error: the elastic job failed (horovodrun exited 1)") and resume in line
    # A summary.json older than this launch is an earlier run's, not this one's.
    code, line = job_outcome(args, "horovodrun exited 1", time.time() + 60)
    assert code == 1 and resume in line, line
    # The summary fit() writes before the final checkpoint and finish(): not finished yet.
    partial = tmp_path / "partial"
    partial.mkdir()
    summary = json.loads((out / "summary.json").read_text())
    summary.pop("metrics")
    (partial / "summary.json").write_text(json.dumps(summary))
    (partial / "metrics.jsonl").write_text((out / "metrics.jsonl").read_text())
    code, line = job_outcome([*args, "--out", str(partial)], "horovodrun exited 1", started)
    # No checkpoint there, and files a plain rerun would be refused for: rerun with --overwrite.
    assert code == 1 and "--resume" not in line and line.endswith("rerun it with --overwrite among the train options")
    code, line = job_outcome([*args, "--out", str(partial), "--overwrite"], "horovodrun exited 1", started)
    assert code == 1 and line.endswith("; rerun it"), line
    # Nothing written at all.
    code, line = job_outcome([*args, "--out", str(tmp_path / "none")], "horovodrun exited 137", started)
    assert code == 1 and "(horovodrun exited 137)" in line and line.endswith("; rerun it"), line


RELAYED = r"""
import sys
w = sys.stderr.write
w("driver: starting\n")
w("[0]<stderr>:epoch 1\n")
w("[0]<stderr>:progress 10%\r[0]<stderr>:progress 20%\r")
w("Traceback (most recent call last):\n  File \"horovodrun\", line 8\nRuntimeError: Horovod detected...\n")
w("[1]<stderr>:a worker line after it\n")
w("Mon Nov 30 10:00:00 2026[1]<stderr>:Error: --out x is not writable: pass a writable --out\n")
w("Exit code: 137")
sys.stdout.write("[0]<stdout>:summary\nProcess 1 exit with status code 2.\nProcess 0 exit with status code 0.\n")
sys.exit(1)
"""


def test_horovodrun_traceback_is_held_back_and_everything_else_passes(capfd):
    """run_horovodrun relays a real child's stderr (here a stand-in for horovodrun's output
    format, not Horovod): lines pass through at once, horovodrun's own unprefixed traceback is
    held for the caller, workers' `[RANK]<stderr>:` lines pass even after it, and their `Error:`
    lines are noted."""
    from hvd_abs.launch.horovod import Refusals, run_horovodrun

    held: list[str] = []
    refusals = Refusals()
    code = run_horovodrun([sys.executable, "-c", RELAYED], held, refusals)
    captured = capfd.readouterr()
    assert code == 1
    assert captured.err == ("driver: starting\n[0]<stderr>:epoch 1\n[0]<stderr>:progress 10%\r"
                            "[0]<stderr>:progress 20%\r[1]<stderr>:a worker line after it\n"
                            "Mon Nov 30 10:00:00 2026[1]<stderr>:Error: --out x is not writable: pass a writable --out\n")
    # A worker's refusal of its input (one `Error:` line, exit 2) is noted for the launcher, with
    # the exit codes horovodrun prints on its stdout (which still passes through).
    assert refusals.said == {1: "Error: --out x is not writable: pass a writable --out"}
    assert refusals.exits == {1: 2, 0: 0}
    assert refusals.outcome() == "--out x is not writable: pass a writable --out"
    assert "".join(held) == ("Traceback (most recent call last):\n  File \"horovodrun\", line 8\n"
                             "RuntimeError: Horovod detected...\nExit code: 137")
    assert captured.out == "[0]<stdout>:summary\nProcess 1 exit with status code 2.\nProcess 0 exit with status code 0.\n"


def test_a_refusal_is_the_outcome_only_when_every_failed_worker_refused():
    from hvd_abs.launch.horovod import Refusals

    r = Refusals()
    r.said = {2: "Error: bad labels"}
    r.exits = {2: 2, 0: 0}
    assert r.outcome() == "bad labels"
    r.exits = {2: 2, 0: 1}  # another worker crashed: a real failure (resume advice), not a refusal
    assert r.outcome() is None
    r.exits = {2: 1}  # an "Error:" line, then a crash
    assert r.outcome() is None
    r.exits = {}  # no exit codes seen
    assert r.outcome() is None


def test_the_launchers_take_a_reset_limit_and_an_elastic_timeout():
    result = CliRunner().invoke(main, ["launch", "horovod", "--reset-limit", "3", "--elastic-timeout", "60",
                                       "--dry-run", "--", *QUICK, "--out", "runs/x"])
    assert result.exit_code == 0 and "--elastic-timeout 60 --reset-limit 3 " in result.output, result.output
    gpu = CliRunner().invoke(main, ["launch", "ray", "--address", "local", "--", *QUICK, "--device", "cuda",
                                    "--out", "runs/x"])
    assert gpu.exit_code == 2 and "--device cuda needs a GPU per worker actor: pass --gpus-per-worker 1" in gpu.output


@pytest.mark.multiprocess
def test_a_job_past_its_reset_limit_stops_saying_so(tmp_path):
    """--reset-limit 0: the batch's growth asks for a second worker, whose join is the first
    reset: Horovod stops the job, and the launcher says why in one line (its traceback kept)."""
    import subprocess

    from conftest import BIN

    out = tmp_path / "run"
    (out / "ledger").mkdir(parents=True)
    (out / "ledger" / "hold-95-world-2").touch()  # (held until the join, so the run cannot end first)
    args = ["--dataset", "digits", "--model", "cnn", "--base-batch", "32", "--quiet", "--callback",
            "hvd_abs.testing.ledger:Ledger", "--method", "absa", "--epochs", "10", "--max-batch", "128",
            "--duration", "1", "--out", str(out)]
    proc = subprocess.run([str(BIN / "hvd-abs"), "launch", "horovod", "--max-np", "2", "--reset-limit", "0", "--",
                           *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "it stopped at --reset-limit 0" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and (out / "elastic" / "horovodrun-error.txt").is_file()
