"""Without --out every run gets a new folder, runs/<date>-<time>, said at the start: a second run
is not refused, and a launcher names the one folder all its workers use."""
from __future__ import annotations

import re
from pathlib import Path

from click.testing import CliRunner

from hvd_abs.cli import main
from hvd_abs.training.run_dir import new_run_dir

QUICK = ["--dataset", "digits", "--model", "mlp", "--method", "sgd", "--epochs", "1", "--train-subset", "256",
         "--threads", "1", "--log-every", "0"]
SAID = re.compile(r"run directory: (runs/\d{8}-\d{6}(?:-\d+)?)\n")


def test_two_runs_without_out_get_two_new_folders(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    dirs = []
    for _ in range(2):
        result = CliRunner().invoke(main, ["train", *QUICK])
        assert result.exit_code == 0, result.output
        dirs.append(SAID.search(result.output).group(1))
    assert dirs[0] != dirs[1] and all((tmp_path / d / "summary.json").is_file() for d in dirs)
    # --resume DIR alone goes on in DIR
    more = CliRunner().invoke(main, ["train", "--quiet", "--resume", dirs[0], "--epochs", "2"])
    assert more.exit_code == 0, more.output
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted(Path(d).name for d in dirs)


def test_a_refused_run_makes_no_folder(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["train", *QUICK, "--keep-checkpoints", "0"])
    assert result.exit_code == 2 and "--keep-checkpoints" in result.output and not (tmp_path / "runs").exists()


def test_a_resume_keeps_the_runs_keep_checkpoints(tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = CliRunner().invoke(main, ["train", *QUICK, "--quiet", "--checkpoint-every", "1", "--keep-checkpoints",
                                      "1", "--out", str(run)])
    assert first.exit_code == 0, first.output
    more = CliRunner().invoke(main, ["train", "--quiet", "--resume", str(run), "--epochs", "3"])
    assert more.exit_code == 0, more.output
    assert len(list((run / "checkpoints").glob("ckpt-*.pt"))) == 1


def test_names_within_one_second_do_not_collide(tmp_path: Path) -> None:
    made = [new_run_dir(tmp_path / "runs") for _ in range(3)]
    assert len(set(made)) == 3 and all(Path(m).is_dir() for m in made)
    assert not Path(new_run_dir(tmp_path / "runs", claim=False)).exists()


def test_a_launcher_names_the_folder_for_all_its_workers(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["launch", "horovod", "--max-np", "2", "--dry-run", "--", *QUICK])
    assert result.exit_code == 0, result.output
    out = SAID.search(result.output).group(1)
    assert f"--out {out}" in result.output and not (tmp_path / "runs").exists()  # (a dry run makes nothing)


def test_an_elastic_worker_without_out_is_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["train", "--elastic", *QUICK])
    assert result.exit_code == 2 and "--elastic needs --out DIR" in result.output
    assert not (tmp_path / "runs").exists()
