"""Bad input FILES (not flags): a damaged metrics.jsonl, plot --out paths, a corrupt image, a
garbage checkpoint, --top-k above the parameter count. Each gets one line naming the fix, exit
code 2, no traceback, and nothing written; a partial last metrics line (a run killed mid-write)
is still skipped, not refused.
"""
from __future__ import annotations

import errno
import logging
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result
from PIL import Image

from hvd_abs.atomic import unwritable_reason
from hvd_abs.cli import main
from hvd_abs.data import load_dataset
from hvd_abs.errors import UserError
from hvd_abs.metrics import MetricsWriter, read_metrics

EPOCH = ('{{"epoch": {n}, "updates": {u}, "global_batch": 32, "eig": 1.5, "lr": 0.1, '
         '"train_acc": 0.5, "test_acc": 0.4, "world_size": 1}}\n')


def run_dir(root: Path, text: str | bytes, name: str = "run") -> Path:
    """A run dir holding only a metrics.jsonl with `text`."""
    d = root / name
    d.mkdir()
    data = text.encode() if isinstance(text, str) else text
    (d / "metrics.jsonl").write_bytes(data)
    return d


GOOD = EPOCH.format(n=1, u=10) + EPOCH.format(n=2, u=20)


def invoke(argv: list[str]) -> Result:
    return CliRunner().invoke(main, [str(a) for a in argv])


def assert_one_line_exit_2(result: Result, *words: str) -> str:
    """Exit 2 through SystemExit (no traceback), one line of message holding every word."""
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip() and not ln.startswith(("WARNING ", "INFO "))]
    assert len(lines) == 1, result.output
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# --- metrics.jsonl: read_metrics and MetricsWriter --------------------------------------------


@pytest.mark.parametrize("bad", [b"\xff\xfe\x00garbage\x80", b"[1, 2]", b'"text"', b"{not json"],
                         ids=["undecodable", "list", "string", "broken json"])
def test_damaged_middle_line_is_refused(tmp_path: Path, bad: bytes) -> None:
    d = run_dir(tmp_path, EPOCH.format(n=1, u=10).encode() + bad + b"\n" + EPOCH.format(n=2, u=20).encode())
    with pytest.raises(UserError, match=r"metrics\.jsonl line 2 .*damaged"):
        read_metrics(d)


def test_partial_last_line_is_skipped_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Killed in the middle of a two-byte UTF-8 character: not even decodable.
    d = run_dir(tmp_path, GOOD.encode() + b'{"epoch": 3, "note": "\xc3')
    with caplog.at_level(logging.WARNING, logger="hvd_abs.metrics"):
        epochs, events = read_metrics(d)
    assert [e["epoch"] for e in epochs] == [1, 2] and events == []
    assert "line 3" not in caplog.text and ":3: unreadable line skipped" in caplog.text


def test_writer_cuts_a_partial_last_line_before_appending(tmp_path: Path) -> None:
    """A resumed run appends after a killed one: the new line must not be glued to the partial one."""
    d = run_dir(tmp_path, GOOD + '{"epoch": 3, "upd')
    writer = MetricsWriter(d)
    writer.event("growth", epoch=3, updates=30, old_batch=32, new_batch=64)
    writer.close()
    epochs, events = read_metrics(d)
    assert [e["epoch"] for e in epochs] == [1, 2] and [e["updates"] for e in events] == [30]
    assert (d / "metrics.jsonl").read_text() == GOOD + '{"event": "growth", "epoch": 3, "updates": 30, ' \
                                                       '"old_batch": 32, "new_batch": 64}\n'


@pytest.mark.parametrize("line", ['[1, 2]\n' + EPOCH.format(n=1, u=10), '{"epoch": "two"}\n'],
                         ids=["list line", "epoch not a number"])
def test_writer_refuses_a_damaged_file(tmp_path: Path, line: str) -> None:
    d = run_dir(tmp_path, line)
    before = (d / "metrics.jsonl").read_bytes()
    with pytest.raises(UserError, match="damaged"):
        MetricsWriter(d)
    assert (d / "metrics.jsonl").read_bytes() == before


def test_resume_with_damaged_metrics_exits_2(tmp_path: Path) -> None:
    from hvd_abs.training import TrainConfig, train

    out = tmp_path / "run"
    common = ["--method", "sgd", "--dataset", "digits", "--model", "mlp", "--base-batch", "32",
              "--train-subset", "64", "--test-subset", "32", "--eig-samples", "32", "--quiet", "--threads", "1"]
    train(TrainConfig(method="sgd", dataset="digits", model="mlp", epochs=1, base_batch=32, batch=32,
                      train_subset=64, test_subset=32, eig_samples=32, quiet=True, threads=1, out=str(out)),
          plot=False)
    metrics = out / "metrics.jsonl"
    metrics.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00binary\xff\n" + metrics.read_bytes())
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    result = invoke(["train", *common, "--epochs", "2", "--resume", out])
    assert_one_line_exit_2(result, "metrics.jsonl line", "damaged")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


# --- hvd-abs plot -------------------------------------------------------------------------------


@pytest.mark.parametrize("text, words", [
    (EPOCH.format(n=1, u=10) + "\xff\x00\n" + EPOCH.format(n=2, u=20), ["line 2", "damaged"]),
    (EPOCH.format(n=1, u=10) + "[1, 2]\n" + EPOCH.format(n=2, u=20), ["line 2", "damaged"]),
    ('{"epoch": 1, "lr": 0.1}\n{"epoch": 2, "lr": 0.1}\n', ["metrics.jsonl", "epoch 1", "updates"]),
    (EPOCH.format(n=1, u='"ten"'), ["metrics.jsonl", "updates"]),
    (EPOCH.format(n=1, u=10).replace('"lr": 0.1', '"lr": "fast"'), ["metrics.jsonl", "lr"]),
    ("", ["no epochs", "nothing to plot"]),
    ('{"event": "growth", "epoch": 1, "updates": 5}\n', ["no epochs", "nothing to plot"]),
], ids=["undecodable line", "list line", "no updates", "updates not a number", "lr not a number", "empty",
        "only events"])
def test_plot_refuses_bad_metrics(tmp_path: Path, text: str, words: list[str]) -> None:
    d = run_dir(tmp_path, text.encode("latin-1") if "\xff" in text else text)
    result = invoke(["plot", d])
    assert_one_line_exit_2(result, *words)
    assert files(d) == {"metrics.jsonl"}


@pytest.mark.parametrize("out, words", [
    ("x.xyz", ["--out", ".png"]),
    ("noformat", ["--out", ".png"]),
    ("afile/x.png", ["--out", "not a directory"]),
    ("afile/deeper/x.png", ["--out", "not a directory"]),
    ("adir", ["--out", "directory", "plots.png"]),
    ("", ["--out is empty"]),
    ("  ", ["--out is empty"]),
], ids=["unknown suffix", "no suffix", "parent is a file", "ancestor is a file", "a directory", "empty", "blank"])
def test_plot_refuses_bad_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, out: str, words: list[str]) -> None:
    monkeypatch.chdir(tmp_path)  # relative --out values resolve here
    d = run_dir(tmp_path, GOOD)
    (tmp_path / "afile").write_text("mine")
    (tmp_path / "adir").mkdir()
    before = files(tmp_path)
    result = invoke(["plot", d, "--out", out])
    assert_one_line_exit_2(result, *words)
    assert files(tmp_path) == before  # no x.xyz, noformat.png, adir.png, ./.png
    assert (tmp_path / "afile").read_text() == "mine"


def test_plot_writes_and_prints_the_real_path(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A run killed mid-write: its undecodable partial last line is skipped, the rest is drawn.
    d = run_dir(tmp_path, GOOD.encode() + b'{"epoch": 3, "\xe2\x82')
    target = tmp_path / "new" / "fig.SVG"  # missing folder is created; suffix case does not matter
    result = invoke(["plot", d, "--out", target])
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == str(target)
    assert target.read_bytes().lstrip().startswith(b"<?xml")
    assert files(tmp_path / "new") == {"fig.SVG"}  # no temp file left


def test_plot_failure_keeps_the_old_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills up half-way through the image: the previous plots.png stays whole."""
    from matplotlib.figure import Figure

    d = run_dir(tmp_path, GOOD)
    (d / "plots.png").write_bytes(b"old image")

    def half_written(self: Figure, fname: object, **kwargs: object) -> None:
        if hasattr(fname, "write"):
            fname.write(b"half")
        else:
            Path(str(fname)).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", half_written)
    result = invoke(["plot", d])
    assert_one_line_exit_2(result, "plots.png", "No space left")
    assert (d / "plots.png").read_bytes() == b"old image"
    assert files(d) == {"metrics.jsonl", "plots.png"}


# --- image folders --------------------------------------------------------------------------------


def _image_folder(root: Path, corrupt_first: bool) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("test", 2)):
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    if corrupt_first:
        (root / "train" / "cat" / "0.png").write_bytes(b"\x89PNG not really an image")
    return root


def test_corrupt_first_image_names_the_file(tmp_path: Path) -> None:
    folder = _image_folder(tmp_path / "data", corrupt_first=True)
    with pytest.raises(UserError, match=r"train/cat/0\.png.*remove or replace"):
        load_dataset("imagefolder", data_dir=folder, cache_dir=tmp_path / "cache")


def test_train_on_corrupt_first_image_exits_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HVD_ABS_CACHE", str(tmp_path / "cache"))
    folder = _image_folder(tmp_path / "data", corrupt_first=True)
    result = invoke(["train", "--dataset", "imagefolder", "--data-dir", folder, "--model", "mlp", "--epochs", "1",
                     "--out", tmp_path / "out", "--quiet"])
    assert_one_line_exit_2(result, "0.png", "remove or replace")
    assert not (tmp_path / "out").exists()


def test_data_dir_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "data.tar").write_bytes(b"not a folder")
    with pytest.raises(UserError) as e:
        load_dataset("imagefolder", data_dir=tmp_path / "data.tar", cache_dir=tmp_path / "cache")
    assert "not a directory" in str(e.value) and "does not exist" not in str(e.value)
    assert "--data-dir" in str(e.value)


# --- unwritable_reason: the --out check of train and the benchmarks -------------------------------


def test_unwritable_reason_refuses_proc_even_for_root() -> None:
    # os.access says yes to root for /proc; the probe (making a folder there) says no.
    assert unwritable_reason("/proc/hvd_abs_no_such_dir/out.json") == "/proc is not a writable directory"


def test_unwritable_reason_refuses_a_read_only_mount(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(ro)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting is not allowed here")
    try:
        assert unwritable_reason(ro / "runs" / "out.json") == f"{ro} is not a writable directory"
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_unwritable_reason_leaves_no_trace(tmp_path: Path) -> None:
    folder = tmp_path / "results"
    folder.mkdir()
    os.utime(folder, ns=(1_000_000_000, 2_000_000_000))  # old times, so that any change would show
    before = folder.stat()
    assert unwritable_reason(folder / "new" / "out.json") is None
    after = folder.stat()
    assert os.listdir(folder) == []  # the probe folder is gone
    assert (after.st_atime_ns, after.st_mtime_ns) == (before.st_atime_ns, before.st_mtime_ns)


# --- advice for missing CIFAR-10: only options the command has -------------------------------------


def test_hessian_without_cifar10_does_not_advise_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HVD_ABS_CACHE", str(tmp_path / "cache"))  # the default data root: empty
    result = invoke(["hessian", "--model", "cnn", "--dataset", "cifar10", "--samples", "64"])
    line = assert_one_line_exit_2(result, "CIFAR-10 not found", "--data-dir")
    assert "--download" not in line, line  # hessian has no --download


def test_train_without_cifar10_advises_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HVD_ABS_CACHE", str(tmp_path / "cache"))
    (tmp_path / "empty").mkdir()
    result = invoke(["train", "--dataset", "cifar10", "--data-dir", tmp_path / "empty", "--model", "mlp",
                     "--epochs", "1", "--out", tmp_path / "out", "--quiet"])
    assert_one_line_exit_2(result, "CIFAR-10 not found", "--download", "--data-dir")
    assert not (tmp_path / "out").exists()


# --- hvd-abs hessian ------------------------------------------------------------------------------


def test_hessian_top_k_above_parameter_count(tmp_path: Path) -> None:
    result = invoke(["hessian", "--dataset", "digits", "--model", "mlp", "--samples", "32", "--top-k", "100000"])
    assert_one_line_exit_2(result, "--top-k", "trainable parameters")


@pytest.mark.parametrize("content", [b"\x00\x01garbage" * 20, None], ids=["random bytes", "foreign pickle"])
def test_hessian_garbage_checkpoint_short_message(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "model.pt"
    if content is None:  # a real torch file, but of objects weights_only refuses
        import fractions

        import torch

        torch.save({"w": fractions.Fraction(1, 2)}, path)
    else:
        path.write_bytes(content)
    result = invoke(["hessian", "--dataset", "digits", "--model", "mlp", "--samples", "32", "--checkpoint", path])
    line = assert_one_line_exit_2(result, "--checkpoint", str(path), "not an hvd-abs checkpoint")
    assert "weights_only" not in line and len(line) < 300, line
