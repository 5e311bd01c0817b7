"""Resume reconciliation: which options a resumed run takes from its checkpoint, which it may
change, and the refusal naming each one that would change what the run computes."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

from hvd_abs.errors import UserError
from hvd_abs.training.config import DEFAULT_MODELS, TrainConfig
from hvd_abs.training.run_dir import saved_run_config

# Options that say how and where a run goes on, not what it computes: a resumed run may change
# them. Every other TrainConfig field defines the run and is kept in its checkpoints.
RESUME_FREE = frozenset({"data_dir", "download", "epochs", "out", "overwrite", "quiet", "device", "threads",
                         "eval_batch", "checkpoint_every", "resume", "elastic", "max_np", "commit_every",
                         "callbacks", "test_subset", "stop_at_update"})


def run_config(cfg: TrainConfig) -> dict[str, Any]:
    """The fields of `cfg` that define the run (see RESUME_FREE), as plain values."""
    return {k: (list(v) if isinstance(v, (tuple, list)) else v)
            for k, v in dataclasses.asdict(cfg).items() if k not in RESUME_FREE}



# Options a resume takes from the run unless given again, and which may change (not compared).
RESUME_KEPT = ("epochs", "checkpoint_every", "test_subset")


def saved_config(cfg: TrainConfig) -> dict[str, Any]:
    """What a checkpoint keeps of `cfg`: the run-defining options, and RESUME_KEPT."""
    return {**run_config(cfg), **{k: getattr(cfg, k) for k in RESUME_KEPT}}


def _effective(config: dict[str, Any]) -> dict[str, Any]:
    """Run-defining values as they take effect: --model auto is the data set's default model, and
    no --batch is --base-batch (so giving either of those on a resume is no change)."""
    c = dict(config)
    if c.get("model") == "auto" and "dataset" in c:
        c["model"] = DEFAULT_MODELS.get(c["dataset"], "cnn")
    if "batch" in c and c["batch"] is None and "base_batch" in c:
        c["batch"] = c["base_batch"]
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
    --epochs, --checkpoint-every, --test-subset), come from its checkpoint unless given
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

