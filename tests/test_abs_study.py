"""benchmarks/abs_study.py in pieces: a study stopped by --stop-after-s and run again continues
every run from its epoch checkpoint, and ends where an uninterrupted study ends.

Runs the real study script (child processes, real trainer) on a small generated Cifar-like image
folder: 10 classes of 32x32 images, so no test needs the shared 60,000-image set.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
STUDY = ROOT / "benchmarks" / "abs_study.py"


def _make_cifar_like(root: Path, n_train: int, n_test: int) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            label = i % 10
            # class-dependent mean colour plus noise: learnable, not trivial
            img = np.clip(rng.normal(25 * label, 60, size=(32, 32, 3)), 0, 255).astype(np.uint8)
            d = root / split / f"c{label}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(d / f"{i}.png")
    return root


def _study(tmp: Path, data: Path, runs: str, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(STUDY), "--protocol", "quick", "--models", "c1", "--methods", "sgd,absa",
           "--seeds", "0", "--epochs", "3", "--train-subset", "1024", "--eval-subset", "50", "--eig-samples", "256", "--jobs", "2",
           "--data-dir", str(data), "--runs-dir", str(tmp / runs), "--out", str(tmp / f"out_{runs}"), *extra]
    env = dict(os.environ, HVD_ABS_CACHE=str(tmp / "cache"), OMP_NUM_THREADS="1")  # 1 thread per run
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _result(tmp: Path, runs: str, method: str) -> dict:
    return json.loads((tmp / runs / f"c1_{method}_s0" / "result.json").read_text())


@pytest.mark.multiprocess
def test_a_stopped_study_continues_where_it_stopped(tmp_path: Path) -> None:
    data = _make_cifar_like(tmp_path / "cifar", n_train=1024, n_test=100)
    _study(tmp_path, data, "whole")
    # Its runs dir gone (another checkout): the finished runs come back from its JSON, none rerun.
    again = _study(tmp_path, data, "again", "--out", str(tmp_path / "out_whole"))
    assert "kept 2 finished runs" in again.stdout and "start " not in again.stdout, again.stdout
    assert _result(tmp_path, "again", "absa") == _result(tmp_path, "whole", "absa")
    # Epochs are evaluated on 50 test images, the finished run on all 100.
    assert _result(tmp_path, "whole", "absa")["test_samples"] == 100
    assert _result(tmp_path, "whole", "absa")["curve_test_samples"] == 50

    # Both runs start at once and stop at their first epoch end past 1 s: after epoch 1 here (an
    # epoch takes over 1 s), after epoch 2 on a machine twice as fast; either way with a checkpoint.
    proc = _study(tmp_path, data, "pieces", "--stop-after-s", "1")
    assert proc.stdout.count("--stop-after-s") == 2, proc.stdout
    for method in ("sgd", "absa"):
        r = _result(tmp_path, "pieces", method)
        assert not r["complete"] and 1 <= r["epochs"] < 3
        assert list((tmp_path / "pieces" / f"c1_{method}_s0" / "checkpoints").glob("ckpt-*.pt"))
    table = json.loads((tmp_path / "out_pieces" / "abs_study.json").read_text())
    assert table["runs"] == [] and len(table["incomplete_runs"]) == 2

    # Run again: both continue where they stopped and finish as the uninterrupted study did.
    proc = _study(tmp_path, data, "pieces")
    assert " epoch 1:" not in proc.stdout and proc.stdout.count(" epoch 3:") == 2, proc.stdout  # resumed
    for method in ("sgd", "absa"):
        whole, pieces = _result(tmp_path, "whole", method), _result(tmp_path, "pieces", method)
        assert pieces["complete"] and pieces["epochs"] == 3
        keys = ("updates", "global_batch", "lr", "eig", "adv_ratio", "train_loss", "test_acc")
        assert [[c[k] for k in keys] for c in pieces["curve"]] == [[c[k] for k in keys] for c in whole["curve"]]
        assert pieces["test_acc"] == whole["test_acc"] and pieces["growths"] == whole["growths"]
        assert not (tmp_path / "pieces" / f"c1_{method}_s0" / "checkpoints").exists()
    # Continuing under other settings would mix protocols: refused, naming the fix.
    cmd = [sys.executable, str(STUDY), "--models", "c1", "--seeds", "0", "--epochs", "4", "--train-subset", "1024",
           "--eval-subset", "50", "--eig-samples", "256", "--data-dir", str(data), "--runs-dir", str(tmp_path / "pieces")]
    refused = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "epochs 3 -> 4" in refused.stderr and "--rerun" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert _result(tmp_path, "whole", "absa")["max_batch_reached"] == 256  # it grew after the cut, from the state saved before it


@pytest.mark.parametrize("argv, words", [
    (["--stop-after-s", "-1"], ["--stop-after-s must be > 0"]),
    (["--eig-samples", "0"], ["--eig-samples must be >= 1"]),
    (["--models", "vgg"], ["unknown model 'vgg'"]),
    (["--seeds", "a"], ["--seeds takes comma-separated integers"]),
    (["--epochs", "0"], ["--epochs must be >= 1"]),  # (0 once fell back to the protocol's epochs)
    (["--jobs", "0"], ["--jobs must be >= 1"]),  # (0 once hung for ever)
])
def test_bad_study_options_exit_2_naming_the_option(argv: list[str], words: list[str], tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(STUDY), *argv, "--runs-dir", str(tmp_path / "runs")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and all(w in proc.stderr for w in words), proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "runs").exists()


def test_bad_data_dir_or_collect_dir_exit_2_writing_nothing(tmp_path: Path) -> None:
    for argv, words in ((["--data-dir", str(tmp_path / "nowhere")], ["CIFAR-10 not found", "--data-dir"]),
                        (["--collect-only"], ["holds no study", "--runs-dir"])):
        proc = subprocess.run([sys.executable, str(STUDY), *argv, "--runs-dir", str(tmp_path / "runs"),
                               "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and all(w in proc.stderr for w in words), proc.stderr
        assert "Traceback" not in proc.stderr
        assert not (tmp_path / "runs").exists() and not (tmp_path / "out").exists()


def test_cuda_without_a_gpu_is_refused_up_front(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: --device cuda is valid here")
    proc = subprocess.run([sys.executable, str(STUDY), "--device", "cuda", "--runs-dir", str(tmp_path / "runs"),
                           "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "use --device cpu" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "out").exists()


def test_a_failed_run_leaves_the_last_results_in_place(tmp_path: Path) -> None:
    data = _make_cifar_like(tmp_path / "cifar", n_train=200, n_test=20)
    out = tmp_path / "out"
    out.mkdir()
    (out / "abs_study.json").write_text('{"runs": ["the last complete study"]}\n')
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "c1_sgd_s0").write_text("")  # the run's directory cannot be made: it fails
    cmd = [sys.executable, str(STUDY), "--models", "c1", "--methods", "sgd", "--seeds", "0", "--epochs", "1",
           "--train-subset", "200", "--eval-subset", "0", "--data-dir", str(data), "--runs-dir", str(tmp_path / "runs"),
           "--out", str(out)]
    env = dict(os.environ, HVD_ABS_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "1 runs failed (c1:sgd:0" in proc.stderr and "not written" in proc.stderr
    assert (out / "abs_study.json").read_text() == '{"runs": ["the last complete study"]}\n'
    assert sorted(p.name for p in out.iterdir()) == ["abs_study.json"]  # no plots either


def test_a_damaged_result_file_is_named_not_a_traceback(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    (runs / "c1_sgd_s0").mkdir(parents=True)
    (runs / "protocol.json").write_text('{"models": {"c1": {}}}')
    (runs / "c1_sgd_s0" / "result.json").write_bytes(b"\xff\xfe\x00 not json")
    proc = subprocess.run([sys.executable, str(STUDY), "--collect-only", "--runs-dir", str(runs), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "c1_sgd_s0/result.json is damaged" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def test_the_medium_protocol_lets_the_signal_act_and_holds_the_controls() -> None:
    """Issue 21's protocol: >= 20 epochs, a check every epoch and a fallback doubling only every
    3 (duration 3), and its seven methods' configurations, each valid."""
    sys.path.insert(0, str(STUDY.parent))
    import abs_study

    args = abs_study.parse_args(["--protocol", "medium", "--models", "resnet20", "--seeds", "0,1,2"])
    proto = abs_study.make_protocol(args)
    assert proto["epochs"] >= 20 and proto["duration"] >= 3 and proto["max_batch"] // proto["base_batch"] == 32
    assert args.methods == list(abs_study.METHODS)
    configs = {m: abs_study.run_config(proto, "resnet20", m, 0, Path("unused"), args) for m in args.methods}
    for cfg in configs.values():
        cfg.validate()
    assert configs["sgd_large_warmup"].warmup_epochs > 0 == configs["sgd_large"].warmup_epochs
    assert (configs["absa_schedule"].method, configs["absa_schedule"].growth_trigger) == ("absa", "schedule")
    gns = configs["absa_gns"]
    assert (gns.method, gns.growth_trigger, gns.batch, gns.base_batch) == ("absa", "gns", 128, 64)
    assert configs["absa"].growth_trigger == "hessian" and configs["absa"].base_batch == 128
    assert abs_study.parse_args(["--protocol", "quick"]).methods == list(abs_study.PAPER_METHODS)
