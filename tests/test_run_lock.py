"""One run at a time per --out (hvd_abs/run_lock.py): two runs started into one folder both
passed the "holds no run" check and wrote every epoch twice and each other's checkpoints."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import BIN
from hvd_abs.cli import main
from hvd_abs.errors import UserError
from hvd_abs.locks import run_lock

TRAIN = ["train", "--dataset", "digits", "--model", "mlp", "--method", "sgd", "--epochs", "1", "--quiet"]


def test_a_second_run_into_a_folder_in_use_is_refused_until_the_first_ends(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with run_lock(out):
        result = CliRunner().invoke(main, [*TRAIN, "--out", str(out)])
        assert result.exit_code == 2 and f"--out {out} is in use by another run" in result.output, result.output
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # it wrote nothing
        # The launchers hold it for their whole job: refused before horovodrun starts.
        proc = subprocess.run([str(BIN / "hvd-abs"), "launch", "horovod", "--max-np", "2", "--", *TRAIN[1:],
                               "--out", str(out)], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "is in use by another run" in proc.stderr, proc.stderr[-2000:]
        assert sorted(p.name for p in out.iterdir()) == [".lock"] and "<stdout>" not in proc.stdout + proc.stderr
        with pytest.raises(UserError, match="in use by another run"):
            with run_lock(out):
                pass
    assert not (out / ".lock").exists()
    result = CliRunner().invoke(main, [*TRAIN, "--out", str(out)])
    assert result.exit_code == 0 and (out / "summary.json").exists() and not (out / ".lock").exists(), result.output


def test_a_killed_holder_leaves_the_folder_free(tmp_path: Path) -> None:
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from hvd_abs.locks import run_lock\n"
                               f"with run_lock({str(out)!r}):\n    print('held', flush=True); time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=f"in use by another run \\(process {holder.pid}\\)"):
            with run_lock(out):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    deadline = time.monotonic() + 10
    while True:
        try:
            with run_lock(out):
                break
        except UserError:
            assert time.monotonic() < deadline, "the lock outlived its killed holder"
            time.sleep(0.1)


def test_without_flock_the_run_goes_on_unlocked_with_a_warning(tmp_path: Path, monkeypatch, caplog) -> None:
    """Some NFS, SMB, FUSE and Lustre mounts have no flock (ENOLCK, ENOSYS, EOPNOTSUPP): runs
    there worked before the lock and must still work, not end in an OSError traceback."""
    import errno
    import fcntl

    def no_flock(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    result = CliRunner().invoke(main, [*TRAIN, "--out", str(tmp_path / "run")])
    assert result.exit_code == 0 and (tmp_path / "run" / "summary.json").exists(), result.output
    assert "has no flock (No locks available): running without the one-run-per-folder lock" in caplog.text
    assert not (tmp_path / "run" / ".lock").exists()


def test_a_run_that_finished_there_meanwhile_is_not_written_over(tmp_path: Path) -> None:
    """The "holds no run" check runs with the options, seconds (data, model) before the lock: a
    run that finished in the folder meanwhile must still stop this one. Here the model factory,
    called between the two, puts a finished run there."""
    import hvd_abs
    from hvd_abs.models import build_model

    out = tmp_path / "run"
    data = hvd_abs.data.load_dataset("digits")

    def model_while_another_run_finishes():
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").write_text('{"epoch": 1}\n')
        return build_model("mlp", data.num_classes, data.in_shape)

    with pytest.raises(UserError, match=f"--out {out} already holds a run"):
        hvd_abs.fit(model=model_while_another_run_finishes, data=data, method="sgd", epochs=1, quiet=True,
                    echo=False, out=str(out))
    assert (out / "metrics.jsonl").read_text() == '{"epoch": 1}\n'
