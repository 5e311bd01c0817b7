"""A run's folder: which files make it a run, when --out may be written, what --overwrite keeps,
one run at a time (the lock), where a resume reads its checkpoint, and the fresh folder of a
run without --out (runs/<date>-<time>).

    OUT/metrics.jsonl, summary.json, plots.png, model.pt   the run's files (RUN_FILES)
    OUT/checkpoints/ckpt-<updates>.pt                     disk checkpoints (training/checkpoint.py)
    OUT/.replaced-run/                                    the run an unfinished --overwrite replaces
    OUT/.lock                                             held while a run writes here
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

from hvd_abs.atomic import can_create_in, unwritable_reason
from hvd_abs.errors import UserError
from hvd_abs.locks import run_lock
from hvd_abs.metrics import METRICS_FILE, SUMMARY_FILE, MetricsWriter

__all__ = ["WEIGHTS_FILE", "RUN_FILES", "CHECKPOINT_DIR", "RUN_DIRS", "REPLACED_DIR", "check_out_dir",
           "prepare_out_dir", "open_writer", "run_lock", "saved_run_config", "read_newest_checkpoint",
           "with_planned_epochs"]

WEIGHTS_FILE = "model.pt"  # the model's state_dict at the run's end: torch.load(..., weights_only=True)
RUN_FILES = (METRICS_FILE, SUMMARY_FILE, "plots.png", WEIGHTS_FILE)  # files whose presence marks a run dir
CHECKPOINT_DIR = "checkpoints"
RUN_DIRS = (CHECKPOINT_DIR, "ledger", "tensorboard")  # folders of a run's own, cleared with its files by --overwrite
RUN_COPIES = ("config.yaml", "metrics.csv")  # cleared with them too, but alone no sign of a run
REPLACED_DIR = ".replaced-run"  # where --overwrite keeps the old run until the new one finishes
# {"run_dir": R, "copy": S}: a worker whose run dir R is on the launcher's host reads R's
# checkpoints from its copy S (elastic/outputs_relay.py fetch_resume)
RESUME_COPY_ENV = "HVD_ABS_RESUME_COPY"
# Set in the workers of a launcher that relays their outputs (elastic/job_channel.py ADDRESS_ENV)
RELAY_ENV = "HVD_ABS_JOB_SERVICE"


def checkpoints_of(run_dir: str | os.PathLike) -> Path:
    """The folder --resume RUN_DIR's checkpoints are read from: RUN_DIR/checkpoints, or this
    worker's copy of the newest one when RUN_DIR is on the launcher's host."""
    path = Path(run_dir).expanduser()
    try:
        mapped = json.loads(os.environ.get(RESUME_COPY_ENV) or "{}")
    except json.JSONDecodeError:
        mapped = {}
    if isinstance(mapped, dict) and mapped.get("run_dir") == str(path.resolve()) and mapped.get("copy"):
        return Path(mapped["copy"]) / CHECKPOINT_DIR
    return path / CHECKPOINT_DIR


def check_out_dir(out: str | os.PathLike, overwrite: bool, resuming: bool = False) -> None:
    """Refuse an unusable out dir without touching anything in it. resuming: a --resume of
    another run into it (which may mean to continue the run there)."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {path} is a file, not a directory: pass another --out")
    if path.is_dir():
        if not can_create_in(path):  # (not os.access alone: it says yes to root, /proc included)
            raise UserError(f"--out {path} is not writable: pass a writable --out")
        for name in RUN_DIRS:  # found otherwise only when the run first writes there (after an epoch)
            if (path / name).exists() and not (path / name).is_dir():
                raise UserError(f"{path / name} is a file, but a run keeps its {name} in a folder of that name: "
                                f"move the file away, or pass another --out")
        if (path / REPLACED_DIR).is_dir() and not overwrite:
            # An --overwrite that did not finish keeps the run it replaces there; a new run
            # finishing here would delete it.
            raise UserError(f"--out {path} holds, in {path / REPLACED_DIR}, the run that an unfinished --overwrite "
                            f"was replacing: continue the new run with --resume {path}, or keep the old one by "
                            f"removing the new run's files and moving it back (mv {path / REPLACED_DIR}/* {path}/), "
                            f"or pass --overwrite to replace it, or another --out")
        held = [name for name in RUN_FILES if (path / name).exists()]
        if held and not overwrite:
            also = f", --resume {path} to continue the run there" if resuming else ""
            raise UserError(f"--out {path} already holds a run ({', '.join(held)}): "
                            f"pass --overwrite to replace it{also}, or another --out")
        return
    why = unwritable_reason(path)  # (path does not exist: the nearest folder above must be writable)
    if why:
        raise UserError(f"--out {path} cannot be created ({why}): pass a writable --out")




RUNS_ROOT = "runs"  # where runs without --out go


def new_run_dir(root: str | os.PathLike = RUNS_ROOT, claim: bool = True) -> str:
    """A folder no run has used: `runs/<date>-<time>`, then -2, -3, ... within one second. claim:
    make it now, so that two runs starting together cannot both take it (a launcher only names
    it: its job lock makes it once the job starts)."""
    stamp, root = time.strftime("%Y%m%d-%H%M%S"), Path(root)
    for n in itertools.count(1):
        path = root / (stamp if n == 1 else f"{stamp}-{n}")
        if not claim:
            if not path.exists():
                return str(path)
            continue
        try:
            path.mkdir(parents=True)
            return str(path)
        except FileExistsError:
            continue
        except OSError as exc:
            raise UserError(f"cannot create the run's folder {path} ({exc.strerror}): pass --out DIR") from None
    raise AssertionError("unreachable")


def prepare_out_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """Create the out dir. With --overwrite the previous run's files (only those) move into
    <out>/.replaced-run, removed when the new run finishes (`finish`): a run that fails on the way
    leaves the old one there. A .replaced-run already there (an earlier --overwrite that failed)
    is the older run and stays; the failed run's own files are removed."""
    path = Path(out).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # e.g. under /proc, or a read-only mount that os.access did not reveal
        raise UserError(f"--out {path} cannot be created ({exc.strerror}): pass a writable --out") from None
    if overwrite:
        # Checkpoints go too: a later --resume would otherwise find the old run's.
        old = [path / name for name in (*RUN_FILES, *RUN_DIRS, *RUN_COPIES) if (path / name).exists()]
        keep = path / REPLACED_DIR
        if old and keep.exists():  # an earlier --overwrite failed: keep its older run, drop this one
            for p in old:
                if p.is_dir():
                    shutil.rmtree(p)
                else:
                    p.unlink()
        elif old:
            keep.mkdir()
            for p in old:
                os.replace(p, keep / p.name)
    return path


def open_writer(out: Path, in_place: bool, rank: int, loggers: Sequence[str] = ()) -> MetricsWriter:
    """The run's metrics writer (it refuses a damaged metrics.jsonl before anything changes). A
    run resumed in its folder (in_place) then drops its model.pt, no longer the weights where the run ends
    (the checkpoints keep them), so a crash on the way leaves none behind; finish writes anew."""
    writer = MetricsWriter(out, enabled=rank == 0, loggers=loggers)
    if rank == 0 and in_place:
        (out / WEIGHTS_FILE).unlink(missing_ok=True)
    return writer



def saved_run_config(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The run config kept in `run_dir`'s newest good checkpoint; None when there is none or it
    predates configs in checkpoints (the caller's options are then taken as they are)."""
    from hvd_abs.training.checkpoint import load_latest  # (torch: not for `--help`)

    found = load_latest(checkpoints_of(run_dir))
    return with_planned_epochs(found[1]) if found is not None else None


def with_planned_epochs(state: dict[str, Any]) -> dict[str, Any] | None:
    """A checkpoint's config with its planned --epochs: checkpoints from before they were kept
    there have them as the adversarial schedule's length (kept for every method)."""
    config = state.get("config")
    planned = (state.get("adversarial") or {}).get("total_epochs")
    if config is None or "epochs" in config or planned is None:
        return config
    return {**config, "epochs": int(planned)}




def read_newest_checkpoint(run_dir: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """(path, state) of the newest checkpoint of `run_dir` that verifies; UserError if none."""
    from hvd_abs.training.checkpoint import load_latest  # (torch: not for `--help`)

    found = load_latest(checkpoints_of(run_dir))
    if found is None:
        raise UserError(f"--resume {run_dir}: no checkpoint there verifies (all missing or damaged); "
                        f"start a new run with another --out")
    return str(found[0]), found[1]

