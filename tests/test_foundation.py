"""The foundation: the CLI answers, real Horovod over Gloo, real Horovod-on-Ray, `hvd-abs env`."""
from __future__ import annotations

import json
import sys

import pytest
from click.testing import CliRunner

from conftest import BIN, WORKERS, horovodrun, run_checked
from hvd_abs import __version__
from hvd_abs.cli import main

SUBCOMMANDS = [[], ["train"], ["launch"], ["launch", "horovod"], ["launch", "ray"], ["hessian"],
               ["bench"], ["env"], ["plot"]]


@pytest.mark.parametrize("args", SUBCOMMANDS, ids=lambda a: " ".join(a) or "hvd-abs")
def test_help_exits_zero(args: list[str]) -> None:
    result = CliRunner().invoke(main, [*args, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_console_script_and_module_entry_points() -> None:
    out = run_checked([str(BIN / "hvd-abs"), "--version"], timeout=60).stdout
    assert __version__ in out
    out = run_checked([sys.executable, "-m", "hvd_abs", "--version"], timeout=60).stdout
    assert __version__ in out


@pytest.mark.multiprocess
def test_horovodrun_two_process_allreduce_over_gloo() -> None:
    proc = run_checked(horovodrun(2, sys.executable, str(WORKERS / "allreduce_worker.py")), timeout=120)
    lines = sorted(line.split("]<stdout>:")[-1] for line in proc.stdout.splitlines() if "sum=" in line)
    assert lines == ["rank=0 size=2 sum=3", "rank=1 size=2 sum=3"], proc.stdout


@pytest.mark.multiprocess
def test_ray_executor_allreduce_across_two_actors() -> None:
    proc = run_checked([sys.executable, str(WORKERS / "ray_allreduce.py")], timeout=240)
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results == [[0, 2, 3.0], [1, 2, 3.0]]


def test_env_reports_horovod_with_pytorch_and_gloo() -> None:
    out = run_checked([str(BIN / "hvd-abs"), "env", "--json"], timeout=120).stdout
    report = json.loads(out)
    assert report["horovod"]["version"] == "0.28.1"
    assert "PyTorch" in report["horovod"]["frameworks"]
    assert "Gloo" in report["horovod"]["controllers"]
    assert report["extension"]["backend"] in {"native", "foreach", "loop"}
    text = run_checked([str(BIN / "hvd-abs"), "env"], timeout=120).stdout
    assert "horovod      0.28.1" in text and "Gloo" in text
