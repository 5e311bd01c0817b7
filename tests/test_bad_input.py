"""Bad input across the CLI (issue 7): `hvd-abs train`, `launch horovod`, `launch ray`,
`hessian`, `plot` and the discovery script. Each case gets ONE line naming the fix, exit code 2,
no traceback, and leaves an existing out dir exactly as it was (names, mtimes, contents).

tests/test_train.py already covers 18 `hvd-abs train` value errors; these are the others. Most
run in-process through click's CliRunner; the console script and the discovery script run as
subprocesses where the process boundary is the point.
"""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import BIN, REPO
from hvd_abs.cli import main
from hvd_abs.training import checkpoint as ck
from hvd_abs.elastic.world_signal import signal_path

# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """{relative path: (mtime_ns, sha256)} of every file under root, and every folder's name."""
    snap: dict[str, tuple[int, str]] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_dir():
            snap[rel + "/"] = (path.stat().st_mtime_ns, "")
        else:
            snap[rel] = (path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
    return snap


@pytest.fixture
def previous_run(tmp_path: Path) -> Path:
    """An out dir holding a finished run: metrics, summary, a good checkpoint, a user's file."""
    out = tmp_path / "prev"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"epoch": 1, "updates": 3}\n')
    (out / "summary.json").write_text('{"epochs": 1}\n')
    (out / "notes.txt").write_text("mine")
    ck.save_checkpoint(out / "checkpoints", {"updates": 3, "w": torch.ones(2)}, 3)
    return out


def assert_one_line_exit_2(output: str, exit_code: int, *must_contain: str) -> str:
    """Exactly one line of message (logging's WARNING lines aside), exit 2, no traceback."""
    assert "Traceback" not in output, output
    lines = [ln for ln in output.splitlines() if ln.strip() and not ln.startswith(("WARNING ", "INFO "))]
    assert exit_code == 2, output
    assert len(lines) == 1, output
    for text in must_contain:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def damaged_checkpoints(run: Path) -> None:
    """Every checkpoint of `run` damaged: one truncated, one with a flipped payload byte."""
    a = ck.save_checkpoint(run / "checkpoints", {"updates": 1}, 1)
    b = ck.save_checkpoint(run / "checkpoints", {"updates": 2}, 2)
    a.write_bytes(a.read_bytes()[:-7])
    data = bytearray(b.read_bytes())
    data[-3] ^= 0x40
    b.write_bytes(bytes(data))


# ---------------------------------------------------------------------------------------------
# hvd-abs train, launch horovod, launch ray, hessian, plot: in-process
# ---------------------------------------------------------------------------------------------

# (argv with OUT for the previous run's dir and TMP for the test's tmp dir, words the message must hold)
CASES = {
    # train: values TrainConfig.validate() or click rejects (test_train.py has 18 others)
    "train: zero max-np": (["train", "--max-np", "0", "--out", "OUT", "--overwrite"], ["--max-np"]),
    "train: zero commit-every": (["train", "--commit-every", "0", "--out", "OUT", "--overwrite"], ["--commit-every"]),
    "train: negative checkpoint-every": (["train", "--checkpoint-every", "-1", "--out", "OUT", "--overwrite"],
                                         ["--checkpoint-every"]),
    "train: NaN lr": (["train", "--lr", "nan", "--out", "OUT", "--overwrite"], ["--lr"]),
    "train: infinite lr": (["train", "--lr", "inf", "--out", "OUT", "--overwrite"], ["--lr"]),
    "train: momentum 1": (["train", "--momentum", "1", "--out", "OUT", "--overwrite"], ["--momentum"]),
    "train: negative warmup": (["train", "--warmup-epochs", "-1", "--out", "OUT", "--overwrite"], ["--warmup-epochs"]),
    "train: zero lr cap": (["train", "--lr-cap", "0", "--out", "OUT", "--overwrite"], ["--lr-cap"]),
    "train: decay epochs not numbers": (["train", "--lr-decay-epochs", "a,b", "--out", "OUT", "--overwrite"],
                                        ["--lr-decay-epochs", "30,60"]),
    "train: cosine with step decay epochs": (["train", "--lr-schedule", "cosine", "--lr-decay-epochs", "3",
                                              "--out", "OUT", "--overwrite"], ["--lr-decay-epochs", "cosine"]),
    "train: a decay epoch twice": (["train", "--lr-decay-epochs", "2,2", "--epochs", "3", "--out", "OUT",
                                    "--overwrite"], ["names an epoch twice", "give each epoch once"]),
    "train: decay epochs empty": (["train", "--lr-decay-epochs=", "--out", "OUT", "--overwrite"],
                                  ["--lr-decay-epochs", "is empty", "leave it out"]),
    "train: a seed past 2**64": (["train", "--seed", str(2**70), "--out", "OUT", "--overwrite"],
                                 ["--seed must be a whole number from -2**63 to 2**64-1"]),
    "train: threads past an int": (["train", "--threads", str(10**23), "--out", "OUT", "--overwrite"],
                                   ["--threads must be at most 4096"]),
    "train: weight decay 1e300": (["train", "--weight-decay", "1e300", "--out", "OUT", "--overwrite"],
                                  ["--weight-decay must be a number from 0 to 1e6"]),
    "train: cosine with a step decay": (["train", "--lr-schedule", "cosine", "--lr-decay", "0.5", "--out", "OUT",
                                         "--overwrite"], ["--lr-decay", "drop one"]),
    "train: unknown augment": (["train", "--augment", "mixup", "--out", "OUT", "--overwrite"], ["--augment", "crop-flip"]),
    "train: unknown method": (["train", "--method", "adam", "--out", "OUT", "--overwrite"], ["--method", "absa"]),
    "train: epochs not a number": (["train", "--epochs", "ten", "--out", "OUT", "--overwrite"], ["--epochs"]),
    "train: zero max batch": (["train", "--max-batch", "0", "--out", "OUT", "--overwrite"], ["--max-batch"]),
    "train: resume dir without checkpoints": (["train", "--resume", "TMP", "--out", "OUT"], ["--resume", "--out"]),
    "train: out dir holds a run": (["train", "--epochs", "1", "--out", "OUT"], ["--overwrite"]),
    "train: out is a file": (["train", "--out", "OUT/notes.txt"], ["--out"]),
    # launch horovod: its own options, the hostfile, and the train options before anything starts
    "horovod: max-np below min-np": (["launch", "horovod", "--min-np", "3", "--max-np", "2", "--", "--out", "OUT"],
                                     ["--max-np", "--min-np"]),
    "horovod: zero min-np": (["launch", "horovod", "--min-np", "0", "--", "--out", "OUT"], ["--min-np"]),
    "horovod: bad hostfile line": (["launch", "horovod", "--hostfile", "TMP/hosts-bad", "--", "--out", "OUT"],
                                   ["line 2", "HOST slots=N"]),
    "horovod: empty hostfile": (["launch", "horovod", "--hostfile", "TMP/hosts-empty", "--", "--out", "OUT"],
                                ["HOST slots=N"]),
    "horovod: zero slots in hostfile": (["launch", "horovod", "--hostfile", "TMP/hosts-zero", "--", "--out", "OUT"],
                                        ["slots must be at least 1"]),
    "horovod: bad cooldown": (["launch", "horovod", "--blacklist-cooldown", "soon", "--", "--out", "TMP/new"],
                              ["MIN,MAX"]),
    "horovod: fewer slots than min-np": (["launch", "horovod", "--min-np", "2", "--max-np", "2", "--hostfile",
                                          "TMP/hosts-one", "--", "--out", "TMP/new"], ["offers 1 slots", "--min-np"]),
    "horovod: cooldown min above max": (["launch", "horovod", "--blacklist-cooldown", "30,5", "--", "--out",
                                         "TMP/new"], ["MIN is above MAX"]),
    "horovod: no data in --data-dir": (["launch", "horovod", "--", "--dataset", "cifar10", "--data-dir", "TMP",
                                        "--out", "TMP/new"], ["CIFAR-10 not found", "--data-dir"]),
    "horovod: empty --out": (["launch", "horovod", "--", "--dataset", "digits", "--out", ""], ["--out DIR"]),
    "horovod: bad train option": (["launch", "horovod", "--", "--epochs", "0", "--out", "OUT", "--overwrite"],
                                  ["--epochs"]),
    "horovod: unknown dataset": (["launch", "horovod", "--", "--dataset", "mnist", "--out", "TMP/new"], ["--dataset"]),
    "horovod: out dir holds a run": (["launch", "horovod", "--", "--out", "OUT"], ["--overwrite"]),
    "horovod: resume, all checkpoints damaged": (["launch", "horovod", "--", "--out", "TMP/damaged", "--resume",
                                                  "TMP/damaged"], ["no checkpoint there verifies"]),
    # launch ray: the same train checks before Ray starts
    "ray: zero max-workers": (["launch", "ray", "--address", "local", "--max-workers", "0", "--", "--out", "OUT"],
                              ["--max-workers"]),
    "ray: adv-ratio above 1": (["launch", "ray", "--address", "local", "--", "--adv-ratio", "2", "--out", "OUT",
                                "--overwrite"], ["--adv-ratio", "[0, 1]"]),
    "ray: negative eps": (["launch", "ray", "--address", "local", "--", "--adv-eps", "-1", "--out", "OUT",
                           "--overwrite"], ["--adv-eps"]),
    "ray: nothing listens at HOST:PORT": (["launch", "ray", "--address", "127.0.0.1:1", "--", "--out", "TMP/new"],
                                          ["no Ray head answers", "--address local"]),  # (Ray retried for minutes)
    "ray: no data in --data-dir": (["launch", "ray", "--address", "local", "--", "--dataset", "cifar10",
                                    "--data-dir", "TMP", "--out", "TMP/new"], ["CIFAR-10 not found", "--data-dir"]),
    "ray: out dir holds a run": (["launch", "ray", "--address", "local", "--", "--out", "OUT"], ["--overwrite"]),
    # hessian
    "hessian: zero samples": (["hessian", "--dataset", "digits", "--model", "mlp", "--samples", "0"], ["--samples"]),
    "hessian: zero tol": (["hessian", "--dataset", "digits", "--model", "mlp", "--tol", "0"], ["--tol"]),
    "hessian: missing data dir": (["hessian", "--dataset", "cifar10", "--data-dir", "TMP/nowhere"], ["--data-dir"]),
    "hessian: missing checkpoint": (["hessian", "--dataset", "digits", "--model", "mlp", "--checkpoint",
                                     "TMP/none.pt"], ["--checkpoint"]),
    "hessian: tampered checkpoint": (["hessian", "--dataset", "digits", "--model", "mlp", "--checkpoint",
                                      "TMP/damaged/checkpoints/ckpt-000002.pt"], ["checksum mismatch"]),
    "hessian: unknown model": (["hessian", "--dataset", "digits", "--model", "vit-huge"], ["vit-huge"]),
    # plot
    "plot: dir without metrics": (["plot", "TMP"], ["metrics.jsonl", "--out"]),
    "plot: missing dir": (["plot", "TMP/nowhere"], ["metrics.jsonl"]),
}


@pytest.mark.parametrize("argv, words", CASES.values(), ids=CASES.keys())
def test_bad_input_one_line_exit_2_nothing_touched(argv: list[str], words: list[str], tmp_path: Path,
                                                   previous_run: Path) -> None:
    (tmp_path / "hosts-bad").write_text("localhost slots=1\n;rm -rf /:2\n")
    (tmp_path / "hosts-empty").write_text("# nothing\n")
    (tmp_path / "hosts-zero").write_text("localhost:0\n")
    (tmp_path / "hosts-one").write_text("localhost slots=1\n")
    damaged_checkpoints(tmp_path / "damaged")
    argv = [a.replace("OUT", str(previous_run)).replace("TMP", str(tmp_path)) for a in argv]
    before_prev, before_tmp = snapshot(previous_run), snapshot(tmp_path)
    result = CliRunner().invoke(main, argv)
    assert_one_line_exit_2(result.output, result.exit_code, *words)
    assert snapshot(previous_run) == before_prev, "the previous run's dir was touched"
    assert snapshot(tmp_path) == before_tmp, "something was written"


def _read_only_mount(folder: Path) -> bool:
    """Make `folder` a read-only tmpfs holding notes.txt: unwritable for root too, whom permission
    bits do not stop. False where mounting is not allowed (no CAP_SYS_ADMIN)."""
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)],
                      capture_output=True).returncode != 0:
        return False
    (folder / "notes.txt").write_text("mine")
    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
    return True


def test_unwritable_out_dir_is_refused(tmp_path: Path, monkeypatch) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    mounted = os.geteuid() == 0 and _read_only_mount(locked)
    if not mounted:
        (locked / "notes.txt").write_text("mine")
        locked.chmod(0o555)
    if os.geteuid() == 0 and not mounted:  # root may write anywhere: make the check see what another user would
        import hvd_abs.training.run_dir as train_module

        real = os.access
        monkeypatch.setattr(train_module.os, "access",
                            lambda p, mode: False if Path(p) == locked and mode & os.W_OK else real(p, mode))
    before = snapshot(locked)
    try:
        if mounted:
            assert not os.access(locked, os.W_OK), "a read-only mount should stop root too"
        for argv in (["train", "--out", str(locked), "--epochs", "1"],
                     ["launch", "horovod", "--", "--out", str(locked)]):
            result = CliRunner().invoke(main, argv)
            assert_one_line_exit_2(result.output, result.exit_code, "not writable", "--out")
        assert snapshot(locked) == before
    finally:
        if mounted:
            subprocess.run(["umount", str(locked)], check=True)
        else:
            locked.chmod(0o755)


def test_resume_or_overwrite_lets_a_run_use_its_own_dir(tmp_path: Path, previous_run: Path) -> None:
    """The refusal above is lifted by --resume or --overwrite (dry run: nothing starts)."""
    for extra in (["--overwrite"], ["--resume", str(previous_run)]):
        result = CliRunner().invoke(main, ["launch", "horovod", "--dry-run", "--", "--out", str(previous_run), *extra])
        assert result.exit_code == 0, result.output


def test_console_script_bad_input_no_traceback(tmp_path: Path, previous_run: Path) -> None:
    """The installed `hvd-abs` entry point, across a process boundary, for a click error and a
    UserError from deep inside the data loader."""
    before = snapshot(previous_run)
    for argv, word in ((["train", "--method", "adam", "--out", str(previous_run)], "--method"),
                       (["train", "--dataset", "imagefolder", "--data-dir", str(tmp_path / "nowhere"),
                         "--out", str(previous_run), "--overwrite", "--quiet"], "--data-dir")):
        proc = subprocess.run([str(BIN / "hvd-abs"), *argv], capture_output=True, text=True, timeout=120, cwd=REPO)
        assert proc.stdout == ""
        assert_one_line_exit_2(proc.stderr, proc.returncode, word)
    assert snapshot(previous_run) == before


# ---------------------------------------------------------------------------------------------
# The discovery script: what it prints is what horovodrun starts
# ---------------------------------------------------------------------------------------------

HOST_LINE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*:[1-9][0-9]*$")


def discovery(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hvd_abs.launch.discovery", *args], capture_output=True, text=True,
                          timeout=60, cwd=REPO)


@pytest.mark.parametrize("hostfile", ["node1:0\n", "-rf:2\n", "a b c\n", "", "node1 slots=two\n",
                                      "ok:1\nhost;reboot:1\n", "$(reboot):1\n"])
def test_discovery_script_rejects_bad_hostfiles(tmp_path: Path, hostfile: str) -> None:
    path = tmp_path / "hosts"
    path.write_text(hostfile)
    proc = discovery("--run-dir", str(tmp_path), "--max-np", "2", "--hostfile", str(path))
    assert proc.returncode == 2 and proc.stdout == "", proc
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_discovery_script_missing_hostfile(tmp_path: Path) -> None:
    proc = discovery("--run-dir", str(tmp_path), "--max-np", "2", "--hostfile", str(tmp_path / "none"))
    assert proc.returncode == 2 and proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("signal_text", ["{", "[]", '{"world_size": "2"}', '{"world_size": 0}', '{"world_size": -3}',
                                         '{"world_size": true}', '{"world_size": 1e9}', "\x00\xff"])
def test_discovery_output_stays_valid_on_a_malformed_signal(tmp_path: Path, signal_text: str) -> None:
    """A malformed world-size signal: only validated `host:slots` lines, min-np slots in all, and
    one line on stderr saying the signal was ignored."""
    signal_path(tmp_path).parent.mkdir(parents=True, exist_ok=True)
    signal_path(tmp_path).write_text(signal_text, errors="surrogateescape")
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost slots=1\n127.0.0.1 slots=3\n")
    proc = discovery("--run-dir", str(tmp_path), "--min-np", "2", "--max-np", "4", "--hostfile", str(hosts))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines and all(HOST_LINE.match(ln) for ln in lines), proc.stdout
    assert sum(int(ln.split(":")[1]) for ln in lines) == 2
    assert "malformed" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args", [["--max-np", "0"], ["--min-np", "3", "--max-np", "2"], ["--max-np", "2", "--slots", "0"],
                                  ["--min-np", "0", "--max-np", "2"]])
def test_discovery_script_rejects_bad_sizes(tmp_path: Path, args: list[str]) -> None:
    proc = discovery("--run-dir", str(tmp_path), *args)
    assert proc.returncode == 2 and proc.stdout == "", proc
