"""--logger csv|tensorboard: copies of metrics.jsonl that agree with it, also after a resume that
cut back lines of an attempt (on the launcher's host when relayed: test_multihost.py); and
--log-every's progress lines under a launcher."""
from __future__ import annotations

import csv
import os
import re
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from hvd_abs.cli import main
from hvd_abs.metrics import EPOCH_FIELDS, read_metrics

TRAIN = ["train", "--dataset", "digits", "--model", "mlp", "--method", "abs", "--growth-trigger", "schedule",
         "--duration", "1", "--epochs", "4", "--base-batch", "32", "--max-batch", "128", "--threads", "1", "--quiet",
         "--logger", "csv", "--logger", "tensorboard"]


def _csv_rows(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and list(rows[0]) == list(EPOCH_FIELDS)
    return rows


def _as_csv(epochs: list[dict]) -> list[dict]:
    return [{k: "" if e[k] is None else str(e[k]) for k in EPOCH_FIELDS} for e in epochs]


def _scalars(run: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_csv_and_tensorboard_follow_metrics_jsonl_through_a_resume(tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = CliRunner().invoke(main, [*TRAIN, "--epochs", "3", "--checkpoint-every", "1", "--out", str(run)])
    assert first.exit_code == 0, first.output
    # A resume from the epoch-2 checkpoint redoes epoch 3 (its lines are cut back first) and runs on.
    from hvd_abs.training.checkpoint import list_checkpoints
    newest = list_checkpoints(run / "checkpoints")[-1]
    newest.unlink()
    resumed = CliRunner().invoke(main, [*TRAIN, "--epochs", "4", "--resume", str(run)])
    assert resumed.exit_code == 0, resumed.output
    epochs, events = read_metrics(run)
    assert [e["epoch"] for e in epochs] == [1, 2, 3, 4]
    assert _csv_rows(run) == _as_csv(epochs)
    loss = _scalars(run, "epoch/train_loss")
    assert loss == [(e["updates"], pytest.approx(e["train_loss"], rel=1e-6)) for e in epochs]  # no step twice
    grown = [(g["updates"], g["new_batch"]) for g in events if g["event"] == "growth"]
    assert [(s, int(v)) for s, v in _scalars(run, "growth/new_batch")] == grown and grown


def test_tensorboard_added_on_a_resume_gets_the_earlier_epochs_too(tmp_path: Path) -> None:
    run = tmp_path / "run"
    csv_only = [*TRAIN[:-2]]  # (TRAIN ends in --logger csv --logger tensorboard)
    assert TRAIN[-4:] == ["--logger", "csv", "--logger", "tensorboard"]
    assert CliRunner().invoke(main, [*csv_only, "--epochs", "2", "--out", str(run)]).exit_code == 0
    more = CliRunner().invoke(main, ["train", "--quiet", "--resume", str(run), "--epochs", "3", "--logger", "csv",
                                     "--logger", "tensorboard"])
    assert more.exit_code == 0, more.output
    epochs = read_metrics(run)[0]
    assert [s for s, _ in _scalars(run, "epoch/train_loss")] == [e["updates"] for e in epochs] and len(epochs) == 3


def test_tensorboard_without_its_package_is_one_line(tmp_path: Path, monkeypatch) -> None:
    from hvd_abs import loggers

    monkeypatch.setitem(loggers.NEEDS, "tensorboard", "no_such_package_hvd_abs_test")  # (as if not installed)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, [*TRAIN])
    assert result.exit_code == 2 and 'pip install "hvd_abs[tensorboard]"' in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()


def test_an_unknown_logger_is_refused_in_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["train", "--logger", "wandb", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "'wandb' is not one of 'csv', 'tensorboard'" in result.output
    assert not (tmp_path / "r").exists()


PROGRESS = re.compile(r"epoch (\d+)/3  update (\d+)  batch (\d+)  loss ([\d.]+)  samples/s (\d+)  eta (\d+:\d\d:\d\d)$")


@pytest.mark.multiprocess
def test_progress_lines_under_the_horovod_launcher(tmp_path: Path) -> None:
    """Under `launch horovod` stderr is no terminal: rank 0 prints a line every --log-every
    updates (the epoch lines come only at epoch ends), its ETA counting down."""
    from conftest import BIN

    args = ["--dataset", "digits", "--model", "mlp", "--method", "sgd", "--base-batch", "32", "--epochs", "3",
            "--threads", "1", "--log-every", "10", "--out", str(tmp_path / "run")]
    proc = subprocess.run([str(BIN / "hvd-abs"), "launch", "horovod", "--min-np", "1", "--max-np", "1", "--", *args],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [m for line in proc.stderr.splitlines() if (m := PROGRESS.search(line))]
    updates = read_metrics(tmp_path / "run")[0][-1]["updates"]
    assert [int(m.group(2)) for m in lines] == list(range(10, updates + 1, 10))
    assert all(int(m.group(3)) == 32 and float(m.group(4)) > 0 for m in lines)
    etas = [sum(int(x) * 60 ** i for i, x in enumerate(reversed(m.group(6).split(":")))) for m in lines]
    assert etas[-1] <= etas[0] and [int(m.group(1)) for m in lines][-1] == 3
