"""Bad input to the benchmark scripts: exit 2 with one line naming the fix, before any data load,
launch or timing, and no result file written. Plus the atomic write the scripts save results with.

Every case runs the script as a subprocess (`python benchmarks/<script>.py ...`), as users do. A
script that did not validate would start the real benchmark (minutes, horovodrun, Ray): each run
is bounded, and its whole process group killed on the timeout, so such a failure is quick and
leaves nothing behind.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from hvd_abs.atomic import write_atomic
from hvd_abs.errors import user_errors_exit_2

TIMEOUT_S = 60  # a validated case takes ~3 s (importing torch); an unvalidated one runs the benchmark


def run_script(script: str, *args: str, root: Path = REPO) -> subprocess.CompletedProcess:
    """Run <root>/benchmarks/<script>.py with `args`; fail the test (killing every process it
    started) if it is still running after TIMEOUT_S."""
    cmd = [sys.executable, f"benchmarks/{script}.py", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: horovodrun / Ray children go too
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} still running after {TIMEOUT_S}s: its input was not rejected up front\n"
                    f"stderr:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def assert_rejected(proc: subprocess.CompletedProcess, word: str) -> None:
    """Exit 2, no traceback, and `word` in the last stderr line (the message itself, not the usage
    text argparse prints above it, which names every flag)."""
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
    assert word in last, (word, proc.stderr)


# (script, bad arguments ("{tmp}": the test's tmp dir), a word of the message). One or two per audit
# finding; the scripts' own tests of good input are the benchmarks themselves.
CASES = [
    # 1. bench_hessian: --skip names, and a skip of every part (an empty report over the last one)
    ("bench_hessian", ["--skip", "hvp,bogus"], "unknown part"),
    ("bench_hessian", ["--skip", "hvp,eigen,vectors,distributed"], "nothing to measure"),
    # 2. bench_eig_trigger: estimators parsed before the data load; the seeds the spread needs
    ("bench_eig_trigger", ["--estimators", "reference,stochastic-abc"], "unknown estimator"),
    ("bench_eig_trigger", ["--train-steps", "4", "--seeds", "0"], "--seeds must be >= 2"),
    # 3. bench_throughput: --worlds and --pairs before the data load and horovodrun
    ("bench_throughput", ["--worlds", "1,abc"], "world sizes >= 1"),
    ("bench_throughput", ["--pairs", "0"], "--pairs must be >= 1"),
    ("bench_throughput", ["--hosts", "a,,b"], "--hosts takes HOST,HOST"),
    ("bench_throughput", ["--threads", "-1"], "--threads must be >= 0"),
    # 4. bench_resize(_ray): job options and the data dir before anything is launched
    ("bench_resize", ["--timeout", "0"], "--timeout must be > 0"),
    ("bench_resize_ray", ["--epochs", "0"], "--epochs must be > 0"),
    ("bench_resize_multihost", ["--pairs", "0"], "--pairs must be >= 1"),
    ("bench_gns", ["--pairs", "0"], "--pairs must be >= 1"),
    ("bench_resize_multihost", ["--k", "0"], "--k must be > 0"),
    ("bench_resize", ["--data-dir", "{tmp}"], "CIFAR-10"),  # the data module names the fix
    # too few updates for the leave to take effect (the QA's run: resizes 1, leave_stall_s null)
    ("bench_resize", ["--train-subset", "512", "--k", "2"], "raise --epochs or --train-subset"),
]


@pytest.mark.parametrize("script,bad_args,word", CASES, ids=[f"{c[0]}:{' '.join(c[1])}" for c in CASES])
def test_bad_argument_exits_2_and_writes_nothing(tmp_path: Path, script: str, bad_args: list[str], word: str) -> None:
    out = tmp_path / "out.json"
    proc = run_script(script, *[a.format(tmp=tmp_path) for a in bad_args], "--out", str(out))
    assert_rejected(proc, word)
    assert not out.exists()
    assert not out.with_suffix(".png").exists()


@pytest.mark.parametrize("script", ["bench_hessian", "bench_throughput"])
def test_out_that_is_a_directory_is_refused_up_front(tmp_path: Path, script: str) -> None:
    # Before: IsADirectoryError only after the whole benchmark had run.
    proc = run_script(script, "--out", str(tmp_path))
    assert_rejected(proc, "is a directory")
    assert list(tmp_path.iterdir()) == []


def test_out_under_a_file_is_refused_up_front(tmp_path: Path) -> None:
    blocker = tmp_path / "results"
    blocker.write_text("a file where a folder should be")
    proc = run_script("bench_eig_trigger", "--out", str(blocker / "eig_trigger.json"))
    assert_rejected(proc, "not a writable directory")
    assert blocker.read_text() == "a file where a folder should be"


@pytest.mark.parametrize("script", ["bench_hessian", "bench_eig_trigger", "bench_resize"])
def test_out_under_proc_is_refused_up_front(script: str) -> None:
    # /proc takes no new files, not even from root, whom os.access lets write anywhere. Before: the
    # check passed as root, and the benchmark crashed with FileNotFoundError after its work.
    proc = run_script(script, "--out", "/proc/hvd_abs_no_such_dir/out.json")
    assert_rejected(proc, "/proc is not a writable directory")


@pytest.mark.parametrize("script", ["bench_eig_trigger", "bench_resize", "bench_throughput"])
def test_default_data_dir_is_the_shared_folder_beside_the_checkout(tmp_path: Path, script: str) -> None:
    # A checkout at <tmp>/clone: every benchmark looks in <tmp>/shared/data/cifar10 (one default,
    # benchmarks/_args.py), and when it is missing says to pass --data-dir, not --download, which
    # the benchmarks lack. Before: bench_eig_trigger read /work/shared/data/cifar10 whatever the
    # checkout, and the others advised --download.
    shutil.copytree(REPO / "benchmarks", tmp_path / "clone" / "benchmarks",
                    ignore=shutil.ignore_patterns("results", "__pycache__"))
    out = tmp_path / "out.json"
    proc = run_script(script, "--out", str(out), root=tmp_path / "clone")
    assert_rejected(proc, str(tmp_path / "shared" / "data" / "cifar10"))
    assert "--data-dir" in proc.stderr and "--download" not in proc.stderr, proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("content,word", [
    (None, "cannot read"),                                  # before: FileNotFoundError
    (b"\x89PNG\r\n\x1a\n\xff\xfe", "is not JSON"),          # before: UnicodeDecodeError
    (b'{"machine": "2 CPU cores", "in_place_cold": {}}', "not a bench_resize result"),  # before: KeyError
    (json.dumps({"machine": "2 CPU cores", "global_batch": 256,  # before: a bar of 0 for the missing leave
                 "in_place_cold": {"join_stall_s": 15.9, "leave_stall_s": None},
                 "in_place_warm": {"join_stall_s": 3.4, "leave_stall_s": None},
                 "restart_1_to_2": {"stall_s": 9.0}, "restart_2_to_1": {"stall_s": 8.0}}).encode(), "lacks measurements"),
], ids=["missing", "not-json", "missing-keys", "null-stall"])
def test_plot_only_names_the_bad_file(tmp_path: Path, content: bytes | None, word: str) -> None:
    out = tmp_path / "resize.json"
    if content is not None:
        out.write_bytes(content)
    proc = run_script("bench_resize", "--plot-only", "--out", str(out))
    assert_rejected(proc, word)
    assert str(out) in proc.stderr
    assert (out.read_bytes() if out.exists() else None) == content
    assert not out.with_suffix(".png").exists()


def test_atomic_write_that_fails_leaves_the_old_file_whole(tmp_path: Path) -> None:
    target = tmp_path / "hessian.json"
    target.write_bytes(b'{"previous": "result"}\n')

    def crash_midway(fh) -> None:
        fh.write(b'{"half": ')
        raise RuntimeError("crash while writing")

    with pytest.raises(RuntimeError, match="crash while writing"):
        write_atomic(target, crash_midway)
    assert target.read_bytes() == b'{"previous": "result"}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["hessian.json"]  # no temp file left beside it


# What in_place and restart returned in real runs. NO_LEAVE: with the QA's options (--train-subset
# 512 --k 2, 3 epochs of 2 updates) the job ended before the leave took effect; before, main wrote
# it, the missing leave counted as 0 in "share_of_full_run_warm". The others: 4 epochs, 8 updates.
NO_LEAVE = {"join_stall_s": 3.35, "leave_stall_s": None, "resizes": 1, "update_s_1": 1.30, "update_s_2": 6.57}
IN_PLACE = {False: {"join_stall_s": 4.97, "leave_stall_s": 0.45, "resizes": 2, "update_s_1": 1.22, "update_s_2": 0.80},
            True: {"join_stall_s": 0.88, "leave_stall_s": 0.61, "resizes": 2, "update_s_1": 1.06, "update_s_2": 1.60}}
RESTART = {(1, 2): {"stall_s": 18.51, "update_s": 2.29}, (2, 1): {"stall_s": 15.80, "update_s": 1.07}}


def run_resize_main(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, in_place) -> tuple[int, Path]:
    """bench_resize.main in this process, the horovodrun runs (minutes) replaced by what they
    returned: the result assembly is what is tested. The data load is real (a tiny 10-class
    folder). Returns the exit code and --out."""
    from PIL import Image

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import bench_resize

    data = tmp_path / "cifar10"
    for split in ("train", "test"):
        for c in range(10):
            (data / split / str(c)).mkdir(parents=True)
            Image.new("RGB", (32, 32), (c * 20, 0, 0)).save(data / split / str(c) / "0.png")
    monkeypatch.setenv("HVD_ABS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(bench_resize, "in_place", lambda args, work, warm: dict(in_place(warm)))
    monkeypatch.setattr(bench_resize, "restart", lambda args, work, old, new, *launch: dict(RESTART[old, new]))
    out = tmp_path / "resize.json"
    monkeypatch.setattr(sys, "argv", ["bench_resize.py", "--data-dir", str(data), "--train-subset", "512",
                                      "--epochs", "6", "--k", "2", "--out", str(out)])
    try:
        code = user_errors_exit_2(bench_resize.main)()
    except SystemExit as exc:
        code = exc.code
    return code, out


def test_a_resize_not_measured_writes_no_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture) -> None:
    code, out = run_resize_main(tmp_path, monkeypatch, lambda warm: NO_LEAVE)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, (code, err)
    assert "leave_stall_s not measured" in err and "--epochs" in err, err
    assert not out.exists() and not out.with_suffix(".png").exists()


def test_resize_result_from_complete_measurements(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code, out = run_resize_main(tmp_path, monkeypatch, IN_PLACE.__getitem__)
    assert code == 0
    result = json.loads(out.read_text())
    warm, down = IN_PLACE[True], RESTART[2, 1]
    assert result["ratio_leave"] == warm["leave_stall_s"] / down["stall_s"]
    assert result["share_of_full_run_warm"] == ((warm["join_stall_s"] + warm["leave_stall_s"])
                                                / result["full_run_s_estimate"])
    assert out.with_suffix(".png").stat().st_size > 0
