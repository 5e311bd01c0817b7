"""Resume reconciliation: which options a resumed run takes from its checkpoint, which it may
change, and the refusal naming each one that would change what the run computes."""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

from hvd_abs.batching.controller import trigger_name
from hvd_abs.errors import UserError
from hvd_abs.training.config import DEFAULT_MODELS, TrainConfig
from hvd_abs.training.run_dir import read_newest_checkpoint, saved_run_config, with_planned_epochs

log = logging.getLogger(__name__)

# Options that say how and where a run goes on, not what it computes: a resumed run may change
# them. Every other TrainConfig field defines the run and is kept in its checkpoints.
RESUME_FREE = frozenset({"data_dir", "download", "epochs", "out", "overwrite", "quiet", "device", "threads",
                         "eval_batch", "checkpoint_every", "resume", "elastic", "max_np", "commit_every",
                         "callbacks", "test_subset", "stop_at_update", "keep_checkpoints", "loggers", "log_every"})


def run_config(cfg: TrainConfig) -> dict[str, Any]:
    """The fields of `cfg` that define the run (see RESUME_FREE), as plain values."""
    return {k: (list(v) if isinstance(v, (tuple, list)) else v)
            for k, v in dataclasses.asdict(cfg).items() if k not in RESUME_FREE}



# Options a resume takes from the run unless given again, and which may change (not compared).
RESUME_KEPT = ("epochs", "checkpoint_every", "test_subset", "loggers", "keep_checkpoints")


def saved_config(cfg: TrainConfig) -> dict[str, Any]:
    """What a checkpoint keeps of `cfg`: the run-defining options, and RESUME_KEPT."""
    return {**run_config(cfg), **{k: getattr(cfg, k) for k in RESUME_KEPT}}


def _effective(config: dict[str, Any]) -> dict[str, Any]:
    """Run-defining values as they take effect: --model auto is the data set's default model, and
    no --batch is --base-batch, and a growth trigger's earlier name is its name (so giving either
of those on a resume is no change)."""
    c = dict(config)
    if c.get("model") == "auto" and "dataset" in c:
        c["model"] = DEFAULT_MODELS.get(c["dataset"], "cnn")
    if "batch" in c and c["batch"] is None and "base_batch" in c:
        c["batch"] = c["base_batch"]
    if "growth_trigger" in c:
        c["growth_trigger"] = trigger_name(c["growth_trigger"])
    return c


def resume_mismatch_error(run_dir: str | os.PathLike, cfg: TrainConfig, saved: dict[str, Any]) -> UserError | None:
    """The error naming each run-defining option of `cfg` that differs from the resumed run's.
    An option newer than the checkpoint had, there, its default: what the code did before it."""
    raw_ours, raw_theirs = run_config(cfg), {**run_config(TrainConfig()), **saved}
    ours, theirs = _effective(raw_ours), _effective(raw_theirs)
    # (Compared as they take effect; named only when they differ as given too: a --batch left out
    # differs with --base-batch, which is named itself.)
    differ = [f"--{k.replace('_', '-')} {_said(ours[k])} (the run has {_said(v)})" for k, v in theirs.items()
              if k in ours and ours[k] != v and raw_ours[k] != raw_theirs[k]]
    if not differ:
        return None
    return UserError(f"--resume {run_dir}: {'; '.join(differ)}: these define the run; leave them out to "
                     f"continue it as it was, or start a new run without --resume")


def _said(value: Any) -> Any:
    """An option's value as a refusal names it: flags on/off, an unset option none."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return value


def resumed_options(options: dict[str, Any], given: Callable[[str], bool]) -> dict[str, Any]:
    """TrainConfig fields `options` for a run resumed from options["resume"] (unchanged without
    one): out defaults to the run's folder; what defines the run, and RESUME_KEPT (its planned
    --epochs, --checkpoint-every, --test-subset, --logger, --keep-checkpoints), come from its checkpoint unless given
    (`given(name)`), and a given defining value that differs is refused here, before the data loads
    (Trainer.resume says the same to callers that skip this). The checkpoint is read again when
    it loads: the cost of saying it early."""
    options = dict(options)
    if options.get("resume") is None:
        return options
    if not given("out"):
        options["out"] = options["resume"]  # continue in place unless told otherwise
    try:
        saved = saved_run_config(options["resume"])
    except OSError:
        saved = None  # unreadable: the resume itself then says what is wrong
    for name, value in (saved or {}).items():
        if name in options and not given(name):
            options[name] = value
    error = resume_mismatch_error(options["resume"], TrainConfig(**options), saved) if saved else None
    if error:
        raise error
    return options


def refuse_finished(trainer: Any) -> None:
    """After a resume: a run that already reached --epochs has nothing left to train (rewriting
    its summary, plots and weights from the same state would be all it did)."""
    if trainer.epoch >= trainer.cfg.epochs:
        raise UserError(f"--resume {trainer.cfg.resume}: that run already reached epoch {trainer.epoch}; pass "
                        f"--epochs above {trainer.epoch} to train it further")


def resume_trainer(trainer: Any, run_dir: str | os.PathLike, collective: bool = True) -> Path:
    """Load the newest checkpoint of `run_dir` that verifies into `trainer`. collective: rank 0
    reads and broadcasts it; else every rank reads it (elastic jobs, where no collective may run before
    the elastic loop, which then syncs from rank 0 anyway)."""
    found = read_newest_checkpoint(run_dir) if (trainer.comm.rank == 0 or not collective) else None
    if collective:
        found = trainer.comm.broadcast_object(found)
    path, state = found
    saved = with_planned_epochs(state)  # None: a checkpoint from before configs were kept
    state.pop("config", None)
    error = resume_mismatch_error(run_dir, trainer.cfg, saved) if saved is not None else None
    if error:
        raise error
    saved_data = state.pop("data", None)  # (None: from before data were identified)
    differ = [f"{k} {trainer.data_id.get(k)} (the run had {v})" for k, v in (saved_data or {}).items()
              if trainer.data_id.get(k) != v]
    if differ:
        raise UserError(f"--resume {run_dir}: the run trained on other data: {'; '.join(differ)}: give it the "
                        f"data it was started with (the options that choose them), or start a new run "
                        f"without --resume")
    before = (copy.deepcopy(trainer.state_dict()), torch.get_rng_state())
    try:
        torch.set_rng_state(state.pop("rng"))
        trainer.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        # Another model, data subset or method: leave this trainer as it was (a caller may
        # start over with it) and name the flags that must match.
        trainer.load_state_dict(before[0])
        torch.set_rng_state(before[1])
        # load_state_dict says "Error(s) in loading state_dict for X:" and then one line each.
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        reason = " ".join((lines[1] if len(lines) > 1 else lines[0] if lines else type(exc).__name__).split())
        which = ("give it the model the run trained (the same class, built with the same options: a "
                 "script's own too)" if trainer.own_model else
                 "pass the --model, --dataset, --method and --train-subset the run was started with")
        raise UserError(f"--resume {run_dir}: checkpoint {Path(path).name} does not fit this run "
                        f"({reason[:300]}); {which}, or another --out for a new run") from None
    if saved is not None:
        # What follows --epochs follows this run's --epochs, which a resume may change: the
        # default decay epochs (E/3, 2E/3), the cosine's length and ABSA's stop at E/2. (The
        # options that shape them define the run: checked above to be the run's own. A
        # checkpoint without them keeps its schedules as they were.)
        trainer.lr_schedule.schedule = trainer.cfg.lr_schedule
        trainer.lr_schedule.decay_epochs = trainer.cfg.decay_epochs()
        trainer.lr_schedule.total_epochs = trainer.cfg.epochs
        trainer.adv.total_epochs = trainer.cfg.epochs
    # A checkpoint taken mid-epoch (--stop-at-update) carries the epoch's start on the clock
    # of the process that wrote it: count the time until then as its training time only.
    if trainer._epoch_clock["start"] is not None:
        trainer._epoch_clock["start"] = time.time() - trainer._epoch_clock["train_s"]
    log.info("resumed from %s at epoch %d, %d updates", path, trainer.epoch, trainer.updates)
    return Path(path)
