"""Bad input to the benchmark scripts: exit 2 with one line naming the fix, before any data load,
launch or timing, and no result file written. Plus the atomic write the scripts save results with.

Every case runs the script as a subprocess (`python benchmarks/<script>.py ...`), as users do. A
script that did not validate would start the real benchmark (minutes, horovodrun, Ray): each run
is bounded, and its whole process group killed on the timeout, so such a failure is quick and
leaves nothing behind.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from hvd_abs.atomic import write_atomic

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
    # 4. bench_resize(_ray): job options and the data dir before anything is launched
    ("bench_resize", ["--timeout", "0"], "--timeout must be > 0"),
    ("bench_resize_ray", ["--epochs", "0"], "--epochs must be > 0"),
    ("bench_resize", ["--data-dir", "{tmp}"], "CIFAR-10"),  # the data module names the fix
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
], ids=["missing", "not-json", "missing-keys"])
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
