"""--config run.yaml: every train option from a file, flags over it, the resolved options in
OUT/config.yaml (which --config takes back), --print-config, bad files in one line, and the
launchers writing the file's values into their workers' command lines."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from hvd_abs.cli import main
from hvd_abs.metrics import read_metrics

CONFIG = {"dataset": "digits", "model": "mlp", "method": "abs", "epochs": 2, "base-batch": 32, "train_subset": 256,
          "lr-decay-epochs": [1], "logger": ["csv"], "threads": 1, "quiet": True, "log-every": 0}
TIMED = ("epoch_s", "samples_per_s", "second_order_s")


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _untimed(run: Path) -> list[dict]:
    return [{k: v for k, v in e.items() if k not in TIMED} for e in read_metrics(run)[0]]


def test_a_config_file_is_the_same_run_as_its_flags_and_flags_override_it(tmp_path: Path) -> None:
    cfg = _write(tmp_path / "run.yaml", yaml.safe_dump(CONFIG))
    shown = CliRunner().invoke(main, ["train", "--config", str(cfg), "--epochs", "3", "--print-config"])
    assert shown.exit_code == 0, shown.output
    resolved = yaml.safe_load(shown.output)
    assert resolved["epochs"] == 3 and resolved["base-batch"] == 32 and resolved["lr-decay-epochs"] == [1]
    assert resolved["loggers"] == ["csv"] and "out" not in resolved and not list(tmp_path.glob("runs"))

    by_file = CliRunner().invoke(main, ["train", "--config", str(cfg), "--out", str(tmp_path / "a")])
    flags = ["--dataset", "digits", "--model", "mlp", "--method", "abs", "--epochs", "2", "--base-batch", "32",
             "--train-subset", "256", "--lr-decay-epochs", "1", "--logger", "csv", "--threads", "1", "--quiet",
             "--log-every", "0", "--out", str(tmp_path / "b")]
    by_flags = CliRunner().invoke(main, ["train", *flags])
    assert by_file.exit_code == by_flags.exit_code == 0, by_file.output + by_flags.output
    assert _untimed(tmp_path / "a") == _untimed(tmp_path / "b")
    assert (tmp_path / "a" / "config.yaml").read_text() == (tmp_path / "b" / "config.yaml").read_text()
    # OUT/config.yaml is a config file: the same options back.
    again = CliRunner().invoke(main, ["train", "--config", str(tmp_path / "a" / "config.yaml"), "--print-config"])
    assert again.exit_code == 0 and again.output == (tmp_path / "a" / "config.yaml").read_text()


@pytest.mark.parametrize("text, says", [
    ("bsae_batch: 3\n", "'bsae_batch' is not an option of hvd-abs train (did you mean base-batch?)"),
    ("epochs: [1\n", "is not valid YAML (line 2)"),
    ("- epochs\n", "holds a list: give a mapping of option names to values"),
    ("epochs: zero\n", "'zero' is not a valid integer"),
    ("optimizer: adam\n", "'adam' is not one of"),
    ("lr: {a: 1}\n", "--lr takes a value like the command line's"),
    ("seed: 2020-01-01\n", "--seed takes a value like the command line's"),
    ("epochs: 1.5\n", "'1.5' is not a valid integer"),  # (not rounded to 1)
    ("epochs: true\n", "--epochs takes a value like the command line's"),
    ("quiet: 1\n", "--quiet is on or off: give true or false"),
])
def test_a_bad_config_file_is_one_line_and_writes_nothing(tmp_path: Path, monkeypatch, text: str, says: str) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = _write(tmp_path / "bad.yaml", text)
    result = CliRunner().invoke(main, ["train", "--config", str(cfg)])
    assert result.exit_code == 2 and says in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()


def test_a_missing_config_file_is_named_and_two_are_refused(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["train", "--config", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "nope.yaml: cannot read it" in result.output
    a, b = _write(tmp_path / "a.yaml", "epochs: 2\n"), _write(tmp_path / "b.yaml", "lr: 0.5\n")
    two = CliRunner().invoke(main, ["train", "--config", str(a), "--config", str(b)])
    assert two.exit_code == 2 and "give one file (got 2)" in two.output


def test_one_value_for_a_repeatable_option_and_repeated_loggers(tmp_path: Path) -> None:
    cfg = _write(tmp_path / "run.yaml", "logger: csv\n")
    shown = CliRunner().invoke(main, ["train", "--config", str(cfg), "--logger", "csv", "--print-config"])
    assert shown.exit_code == 0, shown.output
    assert yaml.safe_load(shown.output)["loggers"] == ["csv"]  # (the flag's list replaces the file's; once)


def test_a_launcher_writes_the_files_values_into_the_workers_command(tmp_path: Path) -> None:
    cfg = _write(tmp_path / "run.yaml", yaml.safe_dump(CONFIG))
    result = CliRunner().invoke(main, ["launch", "horovod", "--max-np", "2", "--dry-run", "--", "--config", str(cfg),
                                       "--epochs", "5", "--out", str(tmp_path / "job")])
    assert result.exit_code == 0, result.output
    worker = result.output.split(" train --elastic --max-np 2 ", 1)[1]
    assert "--config" not in worker and "--base-batch 32" in worker and "--logger csv" in worker
    assert "--epochs 5" in worker and "--epochs 2" not in worker  # the flag given wins
