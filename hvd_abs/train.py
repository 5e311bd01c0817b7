"""The training loop: SGD, ABS and ABSA on one process or on a fixed-size Horovod world.

The loop, with its events (E = epochs, G = global batch, b = micro-batch, W = world size):

    setup:    validate config; check out dir; load data; build model (same seed on all ranks);
              broadcast model + optimizer state from rank 0
    for epoch in [start_epoch, E):
        adv_ratio = adv.ratio(epoch)                 # ABSA only; 0 for sgd/abs
        while sampler has a full global batch G:     # short last batch skipped
            lr = lr_schedule.at(controller, epoch, epoch fraction after this batch)
            for micro-batch m of this rank (layout(G, b, W)):   # accumulation steps
                crop/flip m's images (--augment; drawn per sample from seed, epoch, index)
                replace the first round(adv_ratio * |m|) samples of m by FGSM inputs (eval mode,
                    on the BatchNorm statistics of the update's start: the same on any world size)
                (sum of losses over m / G).backward()      # grads accumulate locally
            grads + [loss_sum, correct, count] (+ BatchNorm running-statistics terms, W > 1:
                hvd_abs/running_stats.py) -> comm.allreduce_sum (one fused call)
            optimizer.step(); sampler.advance(G); updates += 1      [EVENT: update]
        broadcast buffers from rank 0   # the same already, but for momentum=None BatchNorm
        if abs/absa and controller not at the cap:
            eig = top Hessian eigenvalue on eig_samples training samples
                  (drawn from (seed, epoch); sharded over ranks by the second-order engine)
        evaluate on the test split, each rank its shard, sums allreduced
        write the epoch line to metrics.jsonl          [EVENT: epoch end]
        decision = controller.check(eig, epoch)
        if decision.grew: adv.on_growth(...); write a `growth` line   [EVENT: growth]
        sampler.new_epoch()
    summary.json and plots.png on rank 0                [EVENT: end]

Everything a resize or a restore needs is in `Trainer.state_dict()` (model, optimizer, controller,
adversarial schedule, sampler cursor, counters); none of it depends on the world size, and the LR,
the layout and this rank's samples are recomputed from it at every step.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hvd_abs.adversarial import AdversarialSchedule
from hvd_abs.atomic import can_create_in, unwritable_reason, write_atomic
from hvd_abs.augment import AUGMENTS, Augmenter
from hvd_abs.precision import PRECISIONS, forward_model
from hvd_abs.run_lock import run_lock
from hvd_abs.batching.controller import BatchController
from hvd_abs.batching.layout import layout
from hvd_abs.batching.lr import SCALINGS, SCHEDULES, LRSchedule
from hvd_abs.comm import LocalComm, worker_device
from hvd_abs.errors import UserError
from hvd_abs.metrics import METRICS_FILE, SUMMARY_FILE, MetricsWriter, cut_back
from hvd_abs.running_stats import RunningStats, frozen_stats, running_buffers
from hvd_abs.sampling import EpochSampler, rank_micro_batches

log = logging.getLogger(__name__)

METHODS = ("sgd", "abs", "absa")
EIG_METHODS = ("stochastic", "lanczos", "power")
DEFAULT_MODELS = {"digits": "cnn", "cifar10": "resnet20", "cifar100": "resnet20", "svhn": "resnet20",
                  "imagefolder": "tv:resnet18"}
WEIGHTS_FILE = "model.pt"  # the model's state_dict at the run's end: torch.load(..., weights_only=True)
RUN_FILES = (METRICS_FILE, SUMMARY_FILE, "plots.png", WEIGHTS_FILE)  # files whose presence marks a run dir
CHECKPOINT_DIR = "checkpoints"
RUN_DIRS = (CHECKPOINT_DIR, "ledger")  # folders of a run's own, cleared with its files by --overwrite
REPLACED_DIR = ".replaced-run"  # where --overwrite keeps the old run until the new one finishes

# Chosen by benchmarks/bench_eig_trigger.py (results in benchmarks/results/eig_trigger.json):
# streaming power iteration over 8 fresh 128-sample batches (2 burn-in, 6 averaged). On CIFAR-10
# ResNet-20 its spread over seeds (std/mean) was about a fifth of the reference's single-batch
# estimate, at about 7% of an epoch's time on this 2-core CPU.
DEFAULT_EIG_SAMPLES = 1024
DEFAULT_EIG_METHOD = "stochastic"
DEFAULT_EIG_TOL = 1e-2
EIG_BATCH = 128  # samples per Hessian-vector product batch, as the reference (not --base-batch)
DEFAULT_EIG_MAX_ITER = 10


@dataclass
class TrainConfig:
    """Every option of `hvd-abs train`, with its default."""

    method: str = "absa"
    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    model: str = "auto"  # auto: DEFAULT_MODELS[dataset]
    epochs: int = 90
    base_batch: int = 128
    batch: int | None = None  # initial global batch (sgd: the fixed one); None = base_batch
    max_batch: int = 16384
    duration: int = 10
    lr: float = 0.1
    lr_decay: float = 0.2
    lr_decay_epochs: Sequence[int] | None = None  # None: at E/3 and 2E/3 (30, 60 for 90 epochs)
    lr_schedule: str = "step"  # step (the reference: --lr-decay at --lr-decay-epochs) or cosine
    lr_scaling: str = "linear"
    warmup_epochs: float = 0.0
    lr_cap: float | None = None
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    label_smoothing: float = 0.0  # of the training loss (and so of its Hessian); test loss plain
    clip_grad_norm: float | None = None  # max L2 norm of the global batch's gradient (None: no clipping)
    precision: str = "fp32"  # fp32, or bf16: forward passes under autocast (hvd_abs/precision.py)
    augment: str = "none"  # none (the reference), flip, crop, crop-flip: see hvd_abs/augment.py
    adv_eps: float = 0.005
    adv_ratio: float = 0.2
    eig_samples: int = DEFAULT_EIG_SAMPLES
    eig_method: str = DEFAULT_EIG_METHOD
    eig_tol: float = DEFAULT_EIG_TOL
    eig_max_iter: int = DEFAULT_EIG_MAX_ITER
    seed: int = 0
    out: str = "runs/latest"
    overwrite: bool = False
    quiet: bool = False
    device: str = "cpu"
    threads: int | None = None
    eval_batch: int = 1024
    checkpoint_every: int = 0  # epochs between disk checkpoints (0: only at the end)
    resume: str | None = None  # run dir whose newest good checkpoint to continue from
    # Elastic (horovodrun --min-np/--max-np, or the Ray executor): see hvd_abs/elastic/job.py.
    elastic: bool = False
    max_np: int = 1
    commit_every: int = 10  # updates between in-memory commits (and at every growth, epoch end)
    ledger: bool = False  # test instrumentation: each rank logs the sample ids of every update
    train_subset: int | None = None  # use a fixed random subset of this many training samples
    test_subset: int | None = None  # and of this many test samples (quick experiments, benchmarks)
    stop_at_update: int | None = None  # checkpoint and stop after this update (restart benchmarks)

    @property
    def initial_batch(self) -> int:
        return self.base_batch if self.batch is None else self.batch

    def decay_epochs(self) -> list[int]:
        """The step-decay epochs (explicit, or E/3 and 2E/3 when not given; none for cosine)."""
        if self.lr_schedule == "cosine":
            return []
        if self.lr_decay_epochs is None:
            return sorted({d for d in (self.epochs // 3, 2 * self.epochs // 3) if 0 < d < self.epochs})
        return sorted(int(d) for d in self.lr_decay_epochs)

    def validate(self) -> None:
        """Raise UserError naming the flag to fix for the first bad value."""
        def positive(value: Any, flag: str) -> None:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"{flag} must be a positive integer, got {value!r}: pass {flag} N with N >= 1")

        if self.method not in METHODS:
            raise UserError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        positive(self.epochs, "--epochs")
        positive(self.base_batch, "--base-batch")
        positive(self.initial_batch, "--batch")
        positive(self.max_batch, "--max-batch")
        positive(self.duration, "--duration")
        positive(self.eval_batch, "--eval-batch")
        if self.max_batch < self.base_batch:
            raise UserError(f"--max-batch ({self.max_batch}) is below --base-batch ({self.base_batch}): "
                            f"raise --max-batch or lower --base-batch")
        if self.method != "sgd" and self.max_batch < self.initial_batch:
            raise UserError(f"--max-batch ({self.max_batch}) is below --batch ({self.initial_batch}): "
                            f"raise --max-batch or lower --batch")
        # Up to 1e6: far past any useful LR, and scaled by growth it still fits float32 arithmetic
        # (1e300 passed the old check and failed only inside the first update).
        if not 0 < self.lr <= 1e6:
            raise UserError(f"--lr must be a positive number up to 1e6, got {self.lr}")
        if not 0 < self.lr_decay <= 1:
            raise UserError(f"--lr-decay must be in (0, 1] (1 = no decay), got {self.lr_decay}")
        given = self.lr_decay_epochs
        if given is not None and (not isinstance(given, (list, tuple)) or not given
                                  or not all(isinstance(d, int) and not isinstance(d, bool) for d in given)):
            # (A string would be read a character at a time: "12" as decays at 1 and 2.)
            raise UserError(f"--lr-decay-epochs must be a non-empty list of whole epochs, e.g. [30, 60], got {given!r}")
        for d in self.decay_epochs():
            if not 0 < d < self.epochs:
                inside = (f"give epochs from 1 to {self.epochs - 1}" if self.epochs > 1 else
                          "a 1-epoch run has no epoch to decay at: leave --lr-decay-epochs out")
                raise UserError(f"--lr-decay-epochs entry {d} is not inside the run (--epochs {self.epochs}): {inside}")
        if self.lr_schedule not in SCHEDULES:
            raise UserError(f"--lr-schedule must be one of {', '.join(SCHEDULES)}, got {self.lr_schedule!r}")
        if self.lr_schedule == "cosine" and (self.lr_decay_epochs is not None or self.lr_decay != TrainConfig.lr_decay):
            flag = "--lr-decay-epochs" if self.lr_decay_epochs is not None else "--lr-decay"
            raise UserError(f"{flag} belongs to the step schedule, but --lr-schedule is cosine: drop one of them")
        if self.lr_scaling not in SCALINGS:
            raise UserError(f"--lr-scaling must be one of {', '.join(SCALINGS)}, got {self.lr_scaling!r}")
        if not (self.warmup_epochs >= 0 and math.isfinite(self.warmup_epochs)):
            raise UserError(f"--warmup-epochs must be a finite number >= 0, got {self.warmup_epochs}")
        if self.lr_cap is not None and not self.lr_cap > 0:
            raise UserError(f"--lr-cap must be > 0, got {self.lr_cap}")
        if not 0 <= self.momentum < 1:
            raise UserError(f"--momentum must be in [0, 1), got {self.momentum}")
        if self.nesterov and self.momentum == 0:
            raise UserError("--nesterov needs momentum: pass --momentum above 0 (e.g. 0.9), or drop --nesterov")
        if not 0 <= self.label_smoothing < 1:
            raise UserError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.clip_grad_norm is not None and not (self.clip_grad_norm > 0 and math.isfinite(self.clip_grad_norm)):
            raise UserError(f"--clip-grad-norm must be a finite number > 0, got {self.clip_grad_norm}: "
                            f"leave it out for no clipping")
        if not 0 <= self.weight_decay <= 1e6:  # (as --lr: 1e300 passed "finite", then overflowed float32)
            raise UserError(f"--weight-decay must be a number from 0 to 1e6, got {self.weight_decay}")
        if self.precision not in PRECISIONS:
            raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.augment not in AUGMENTS:
            raise UserError(f"--augment must be one of {', '.join(AUGMENTS)}, got {self.augment!r}")
        if not (self.adv_eps >= 0 and math.isfinite(self.adv_eps)):
            raise UserError(f"--adv-eps must be >= 0 (on the [0, 1] pixel scale), got {self.adv_eps}")
        if not 0 <= self.adv_ratio <= 1:
            raise UserError(f"--adv-ratio must be in [0, 1], got {self.adv_ratio}")
        positive(self.eig_samples, "--eig-samples")
        if self.eig_method not in EIG_METHODS:
            raise UserError(f"--eig-method must be one of {', '.join(EIG_METHODS)}, got {self.eig_method!r}")
        if not self.eig_tol > 0:
            raise UserError(f"--eig-tol must be > 0, got {self.eig_tol}")
        positive(self.eig_max_iter, "--eig-max-iter")
        if self.threads is not None:
            positive(self.threads, "--threads")
            if self.threads > 4096:  # (torch takes a C int; 1e23 threads ended in an OverflowError)
                raise UserError(f"--threads must be at most 4096, got {self.threads}: leave it out for one per core")
        if not (isinstance(self.seed, int) and not isinstance(self.seed, bool) and -2**63 <= self.seed < 2**64):
            raise UserError(f"--seed must be a whole number from -2**63 to 2**64-1 (what torch.manual_seed takes), "
                            f"got {self.seed!r}")
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 0:
            raise UserError(f"--checkpoint-every must be >= 0 epochs (0: only at the end), got {self.checkpoint_every!r}")
        positive(self.commit_every, "--commit-every")
        for value, flag in ((self.train_subset, "--train-subset"), (self.test_subset, "--test-subset"),
                            (self.stop_at_update, "--stop-at-update")):
            if value is not None:
                positive(value, flag)
        positive(self.max_np, "--max-np")
        if self.resume is not None and not (Path(self.resume).expanduser() / CHECKPOINT_DIR).is_dir():
            raise UserError(f"--resume {self.resume}: no {CHECKPOINT_DIR}/ folder there; pass the --out "
                            f"directory of the run to continue")
        if self.device not in ("cpu", "cuda"):
            raise UserError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda was asked but no CUDA device is visible: pass --device cpu")
        if not str(self.out).strip():
            raise UserError("--out is empty: pass the directory for the run's files")
        # A run dir may be written into when asked (--overwrite), when it is the run being resumed,
        # or when it is the folder of the elastic job this worker belongs to (the launcher made
        # <out>/elastic/ after its own checks). Resuming A into another dir B is a new run in B.
        joins_job = self.elastic and (Path(self.out).expanduser() / "elastic").is_dir()
        check_out_dir(self.out, self.overwrite or self.resumes_in_place or joins_job, resuming=self.resume is not None)

    @property
    def resumes_in_place(self) -> bool:
        """--resume DIR with --out DIR (the default): the run continues in its own folder."""
        return self.resume is not None and (Path(self.resume).expanduser().resolve()
                                            == Path(self.out).expanduser().resolve())

    @property
    def replaces_out(self) -> bool:
        """--overwrite that applies: the run in --out is replaced, unless it is the one resumed."""
        return self.overwrite and not self.resumes_in_place


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


# Options that say how and where a run goes on, not what it computes: a resumed run may change
# them. Every other TrainConfig field defines the run and is kept in its checkpoints.
RESUME_FREE = frozenset({"data_dir", "download", "epochs", "out", "overwrite", "quiet", "device", "threads",
                         "eval_batch", "checkpoint_every", "resume", "elastic", "max_np", "commit_every",
                         "ledger", "test_subset", "stop_at_update"})


def run_config(cfg: TrainConfig) -> dict[str, Any]:
    """The fields of `cfg` that define the run (see RESUME_FREE), as plain values."""
    return {k: (list(v) if isinstance(v, (tuple, list)) else v)
            for k, v in dataclasses.asdict(cfg).items() if k not in RESUME_FREE}


def saved_run_config(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The run config kept in `run_dir`'s newest good checkpoint; None when there is none or it
    predates configs in checkpoints (the caller's options are then taken as they are)."""
    from hvd_abs.elastic.checkpoint import load_latest

    found = load_latest(Path(run_dir).expanduser() / CHECKPOINT_DIR)
    return _with_planned_epochs(found[1]) if found is not None else None


def _with_planned_epochs(state: dict[str, Any]) -> dict[str, Any] | None:
    """A checkpoint's config with its planned --epochs: checkpoints from before they were kept
    there have them as the adversarial schedule's length (kept for every method)."""
    config = state.get("config")
    planned = (state.get("adversarial") or {}).get("total_epochs")
    if config is None or "epochs" in config or planned is None:
        return config
    return {**config, "epochs": int(planned)}


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


EigenFn = Callable[..., Any]


class StopRequested(Exception):
    """--stop-at-update reached: leave the loop as at the end of the run (checkpoint included)."""


def _subset(data: Any, n_train: int | None, n_test: int | None) -> Any:
    """`data` with a fixed random subset (seed 12345, the same for every run and rank) of its
    training and test samples; `data` itself when neither is given."""
    if not n_train and not n_test:
        return data
    gen = torch.Generator().manual_seed(12_345)
    pick = lambda n, k: torch.randperm(n, generator=gen)[:k].sort().values if k and k < n else None  # noqa: E731
    tr, te = pick(len(data.train_y), n_train), pick(len(data.test_y), n_test)
    return dataclasses.replace(
        data,
        train_x=data.train_x[tr] if tr is not None else data.train_x, train_y=data.train_y[tr] if tr is not None else data.train_y,
        test_x=data.test_x[te] if te is not None else data.test_x, test_y=data.test_y[te] if te is not None else data.test_y)


# Data sets loaded ahead of time by a warm standby (hvd_abs/elastic/standby.py), by (name, dir).
_PRELOADED: dict[tuple[str, str | None], Any] = {}


def _data_key(dataset: str, data_dir: str | None) -> tuple[str, str | None]:
    return dataset, str(Path(data_dir).expanduser().resolve()) if data_dir else None


def preload(train_args: list[str]) -> None:
    """Load the data set of a `train` command line into memory now, for the Trainer the same
    process builds later (a warm standby does this before its slot is advertised)."""
    from hvd_abs.commands.train import command
    from hvd_abs.data import load_dataset

    args = list(train_args[1:] if train_args[:1] == ["train"] else train_args)
    params = command.make_context("train", args, resilient_parsing=True).params
    key = _data_key(params["dataset"], params["data_dir"])
    _PRELOADED[key] = load_dataset(params["dataset"], data_dir=params["data_dir"],
                                   download=bool(params.get("download")))


def _new_epoch_clock(samples_seen: int) -> dict[str, Any]:
    return {"start": None, "train_s": 0.0, "samples0": samples_seen, "world": None}


def _default_eigen_fn() -> EigenFn:
    from hvd_abs.batching.eig_trigger import estimate_top_eigenvalue

    return estimate_top_eigenvalue


def _progress(total: int, desc: str, enabled: bool):
    """A tqdm bar on rank 0 when wanted and stderr is a TTY, else None."""
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def data_id(data: Any) -> dict[str, Any]:
    """What tells the training data a run trains on from other data, cheaply and bit-exactly (any
    thread count, any machine): size, sample shape, classes, and crc32s of all training labels and
    of 64 evenly spaced training inputs. Kept in checkpoints; a resume on other data is refused.
    (The test split may change on a resume, as --test-subset may.)"""
    import zlib

    n = len(data.train_y)
    picks = torch.linspace(0, n - 1, steps=min(64, n)).long()
    crc = lambda t: zlib.crc32(t.detach().cpu().contiguous().numpy().tobytes())  # noqa: E731
    # (In canonical dtypes: int32 and int64 copies of the same labels are the same data.)
    return {"train samples": n, "sample shape": list(data.train_x.shape[1:]), "classes": int(data.num_classes),
            "label crc32": crc(data.train_y.long()), "input crc32": crc(data.train_x[picks].float())}


def _check_no_arguments_needed(factory: Callable[..., Any]) -> None:
    """Refuse a model factory that cannot be called as factory() (UserError naming the fix)."""
    import inspect

    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # no signature to read (some builtins): calling it will tell
        return
    needed = [p.name for p in params if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if needed:
        raise UserError(f"model= is called with no arguments, but {getattr(factory, '__name__', 'it')} needs "
                        f"{', '.join(needed)}: pass e.g. model=lambda: MyNet(width=16)")


def _check_model_fits(model: nn.Module, data: Any, device: torch.device) -> None:
    """A caller's own model, run once in eval mode and once in training mode, without gradients,
    on two training samples: one that fails on the data's inputs, or gives other than one logit
    per class (say, auxiliary heads in training mode), is refused here, before anything is
    written (and lazy modules take their shapes before the optimizer is made). The model's
    buffers (BatchNorm statistics) and torch's RNG (dropout) are left as they were. Raises
    UserError naming the shapes."""
    x = data.train_x[:2].to(device)
    want = (len(x), int(data.num_classes))
    for training in (False, True):
        mode = " in training mode" if training else ""
        try:
            out = _forward_untouched(model, x, training)
        except Exception as exc:  # the model's own error, told with the shapes that caused it
            hint = ""
            if x.dim() == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
                hint = " The inputs look channels-last (N, H, W, C): give x.permute(0, 3, 1, 2)."
            raise UserError(f"the model fails{mode} on a batch of inputs shaped {tuple(x.shape)} "
                            f"({type(exc).__name__}: {' '.join(str(exc).split())[:240]}): make the model take the "
                            f"data's (N, C, H, W) inputs.{hint}") from None
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        if shape != want:
            raise UserError(f"the model gives {shape}{mode} for a batch of {want[0]}: it must give {want} logits, "
                            f"one per class of the data ({want[1]} classes), in eval and training mode")


def _forward_untouched(model: nn.Module, x: torch.Tensor, training: bool) -> Any:
    """model(x) without gradients in training or eval mode; the model's mode, its buffers (also one
    that forward replaces or adds) and the torch, Python and numpy RNG states as they were before."""
    import random

    import numpy as np

    # (A lazy module's buffers get their shape in this call: eval mode leaves them as made.)
    saved = [(module, name, b, b.detach().clone()) for module in model.modules()
             for name, b in module._buffers.items() if b is not None and not nn.parameter.is_lazy(b)]
    existed = {(id(module), name) for module in model.modules() for name in module._buffers}
    rngs = torch.get_rng_state(), random.getstate(), np.random.get_state()
    cuda_rng = torch.cuda.get_rng_state(x.device) if x.device.type == "cuda" else None
    was_training = model.training
    model.train(training)
    try:
        with torch.no_grad():
            return model(x)
    finally:
        model.train(was_training)
        with torch.no_grad():
            for module, name, buffer, value in saved:
                buffer.copy_(value)
                module._buffers[name] = buffer
            for module in model.modules():  # and none that forward registered anew
                for name in [n for n in module._buffers if (id(module), n) not in existed]:
                    del module._buffers[name]
        torch.set_rng_state(rngs[0])
        random.setstate(rngs[1])
        np.random.set_state(rngs[2])
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, x.device)


class Trainer:
    """One training job (see the module docstring). `comm` defaults to one process."""

    def __init__(self, cfg: TrainConfig, comm: Any = None, eigen_fn: EigenFn | None = None,
                 data: Any = None, model: nn.Module | Callable[[], nn.Module] | None = None,
                 broadcast: bool = True) -> None:
        """data: a `hvd_abs.data.Splits` (default: cfg.dataset, loaded). model: a module, or a
        function making one, called after seeding with cfg.seed (default: cfg.model, built)."""
        cfg.validate()
        self.cfg = cfg
        self.comm = comm if comm is not None else LocalComm()
        self.eigen_fn = eigen_fn
        self.device = worker_device(cfg.device, self.comm.local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # also for what allocates on "cuda" (extension, Horovod)

        self.dataset_name = cfg.dataset if data is None else data.name
        if data is None:
            data = _PRELOADED.pop(_data_key(cfg.dataset, cfg.data_dir), None)
        if data is None:
            from hvd_abs.data import load_dataset

            data = load_dataset(cfg.dataset, data_dir=cfg.data_dir, download=cfg.download)
        for asked, have, flag, split in ((cfg.train_subset, len(data.train_y), "--train-subset", "training"),
                                         (cfg.test_subset, len(data.test_y), "--test-subset", "test")):
            # (It would silently be all of them. A resumed run's own --train-subset, from before
            # this was refused, keeps that meaning; a --test-subset may change on a resume, and
            # the checkpoints that keep one kept it checked.)
            if asked is not None and asked > have and (cfg.resume is None or flag == "--test-subset"):
                raise UserError(f"{flag} {asked} exceeds the {have} {split} samples: pass at most {have}, or leave "
                                f"{flag} out")
        self.data = _subset(data, cfg.train_subset, cfg.test_subset)
        n_train = int(self.data.train_y.shape[0])
        if cfg.initial_batch > n_train:
            # Only full batches are taken: this run would make no update at all.
            raise UserError(f"--batch {cfg.initial_batch} exceeds the {n_train} training samples: pass a "
                            f"smaller --batch (or a larger --train-subset)")
        own_model = self.own_model = model is not None
        if model is None:
            from hvd_abs.models import build_model

            name = DEFAULT_MODELS.get(cfg.dataset, "cnn") if cfg.model == "auto" else cfg.model
            torch.manual_seed(cfg.seed)  # identical initial weights on every rank
            model = build_model(name, data.num_classes, data.in_shape, mean=data.mean, std=data.std)
            self.model_name = name
        else:
            if not isinstance(model, nn.Module):  # a factory: seeded like the built-in models
                _check_no_arguments_needed(model)
                torch.manual_seed(cfg.seed)
                made = model()
                if not isinstance(made, nn.Module):
                    raise UserError(f"model= made a {type(made).__name__}, not a torch.nn.Module: pass a module, "
                                    f"or a class or function returning one")
                model = made
            self.model_name = type(model).__name__
        self.model = model.to(self.device)
        if own_model:
            _check_model_fits(self.model, self.data, self.device)
        # The training and test forward passes (bf16: under autocast); the Hessian's use self.model.
        self.forward = forward_model(self.model, cfg.precision, self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(self.params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                         weight_decay=cfg.weight_decay)

        adaptive = cfg.method != "sgd"
        self.controller = BatchController(cfg.initial_batch, cfg.max_batch if adaptive else cfg.initial_batch,
                                          cfg.duration)
        self.lr_schedule = LRSchedule(cfg.lr, cfg.lr_decay, cfg.decay_epochs(), cfg.lr_scaling,
                                      cfg.warmup_epochs, cfg.lr_cap, cfg.lr_schedule, cfg.epochs)
        self.adv = AdversarialSchedule(cfg.adv_ratio if cfg.method == "absa" else 0.0, cfg.adv_eps, cfg.epochs,
                                       at_max=self.controller.at_max)
        self.sampler = EpochSampler(int(self.data.train_y.shape[0]), cfg.seed)
        self.augment = Augmenter(cfg.augment, cfg.seed, n_train, tuple(self.data.train_x.shape[1:]))
        self.data_id = data_id(self.data)
        self.updates = 0
        self.samples_seen = 0
        self.elapsed_s = 0.0
        self.second_order_total_s = 0.0
        self.history: list[dict[str, Any]] = []  # epoch lines so far (rank 0's summary)
        self.growths: list[dict[str, Any]] = []
        # loss_sum, correct, count (global) of the epoch so far. Kept on the device and read once
        # an epoch: reading it every update would stop a GPU's queue from running ahead of Python.
        self._epoch_sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        # The epoch so far, also across an elastic reset, which re-enters run_epoch mid-epoch:
        # its start (wall clock, so a reset's stall counts), seconds spent training, samples_seen
        # at its start, and the world size of its latest update.
        self._epoch_clock: dict[str, Any] = _new_epoch_clock(self.samples_seen)
        self._warned_eig_samples = False
        self._bn_stats: RunningStats | None = None  # made when the world has more than one rank
        self._bn_buffers: list[torch.Tensor] | None = None  # BatchNorm running stats, for ABSA's FGSM
        # The growth check skipped after the run's last epoch ({eig, epoch}), for a --resume that
        # extends the run (see fit).
        self._pending_check: dict[str, Any] | None = None
        # Hooks of the elastic layer (hvd_abs/elastic/job.py): after every update, and after each
        # epoch's bookkeeping with whether the batch grew. They may raise to leave the loop.
        self.on_step: Callable[[], None] | None = None
        self.last_step_ids: torch.Tensor | None = None
        self.last_step_epoch = 0
        self.on_epoch_end: Callable[[bool], None] | None = None
        self.set_threads()

        if broadcast:  # elastic jobs sync from rank 0 inside the elastic loop instead
            self.comm.broadcast_state(self.model, self.optimizer)

    def set_threads(self) -> None:
        """torch threads for this rank; called again after an elastic resize."""
        if self.cfg.threads is not None:
            torch.set_num_threads(self.cfg.threads)
        elif self.comm.size > 1:
            # Workers share the machine's cores: oversubscription makes every rank slower.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.comm.size))

    # --- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue, independent of the world size.

        Like torch's own state dicts it holds references to live tensors: deep-copy it to snapshot.
        """
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "controller": self.controller.state_dict(), "lr_schedule": self.lr_schedule.state_dict(),
                "adversarial": self.adv.state_dict(), "sampler": self.sampler.state_dict(),
                "updates": self.updates, "samples_seen": self.samples_seen, "elapsed_s": self.elapsed_s,
                "second_order_total_s": self.second_order_total_s,
                "epoch_sums": self._epoch_sums.tolist(), "epoch_clock": dict(self._epoch_clock),
                "history": list(self.history), "growths": list(self.growths),
                "pending_check": dict(self._pending_check) if self._pending_check else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict()` output."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.controller.load_state_dict(state["controller"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.adv.load_state_dict(state["adversarial"])
        self.sampler.load_state_dict(state["sampler"])
        self.updates = int(state["updates"])
        self.samples_seen = int(state["samples_seen"])
        self.elapsed_s = float(state["elapsed_s"])
        self.second_order_total_s = float(state["second_order_total_s"])
        self._epoch_sums = torch.tensor(state["epoch_sums"], dtype=torch.float64, device=self.device)
        # (Checkpoints from before the clock was kept: the epoch's clock starts now.)
        self._epoch_clock = dict(state.get("epoch_clock") or _new_epoch_clock(self.samples_seen))
        self.history = list(state["history"])
        self.growths = list(state["growths"])
        # (Checkpoints from before it was kept: an extended run skips that one check, as it did.)
        self._pending_check = state.get("pending_check")

    # --- derived quantities ------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def current_lr(self, epoch_fraction: float | None = None) -> float:
        """LR for the next update: a function of the controller state and the epoch progress."""
        frac = self.sampler.epoch_fraction if epoch_fraction is None else epoch_fraction
        return self.lr_schedule.at(self.controller, self.epoch, frac)

    # --- one update --------------------------------------------------------------------------------
    def step(self) -> bool:
        """One parameter update on the next global batch; False (nothing done) at the epoch's end.
        Raises StopRequested once --stop-at-update updates are done."""
        if self.cfg.stop_at_update is not None and self.updates >= self.cfg.stop_at_update:
            raise StopRequested
        G = self.controller.global_batch
        idx = self.sampler.next_indices(G)
        if idx is None:
            return False
        lay = layout(G, self.cfg.base_batch, self.comm.size)
        # LR at the end of this batch's share of the epoch: a warm-up never starts at exactly 0.
        lr = self.current_lr((self.sampler.position + G) / self.sampler.num_samples)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # None, not zeros: backward then takes each gradient as it is instead of adding it to a
        # zeroed tensor: 2 kernels a parameter less (118 for ResNet-20), and a GPU update of a
        # model this small is bound by kernel launches.
        self.optimizer.zero_grad(set_to_none=True)
        self.model.train()
        # loss_sum, correct, count on this rank, kept on the device: reading them per micro-batch
        # (.item()) would stall a GPU at every micro-batch (128 stalls per update at G = 16384).
        stats = torch.zeros(3, dtype=torch.float64, device=self.device)
        micros = rank_micro_batches(idx, lay, self.comm.rank)
        ids = lay.micro_ids_for(self.comm.rank)  # their indices j in the update (0..K-1)
        bn = self._running_stats()
        if bn is not None:
            bn.begin(lay.num_micro)
        # FGSM runs in eval mode, on the running statistics: those of the update's start, which
        # every rank holds (within the update a rank has only its own micro-batches' updates).
        adv_stats = None
        if self.adv.ratio(self.epoch) > 0:
            if self._bn_buffers is None:
                self._bn_buffers = running_buffers(self.model)
            adv_stats = torch._foreach_mul(self._bn_buffers, 1.0) if self._bn_buffers else None
        if self.cfg.ledger:  # test instrumentation only: keep it off the hot path otherwise
            self.last_step_ids = torch.cat(micros) if micros else idx[:0]
            self.last_step_epoch = self.epoch
        for j, micro in zip(ids, micros):
            if bn is not None:
                bn.before(j)
            x = self.data.train_x[micro].to(self.device, non_blocking=True)  # (m, C, H, W)
            y = self.data.train_y[micro].to(self.device, non_blocking=True)  # (m,)
            x = self.augment(x, micro, self.epoch)  # (the same crops on any world size)
            if self.adv.initial_ratio > 0:
                with frozen_stats(self._bn_buffers or [], adv_stats):
                    x, _ = self.adv.apply(self.forward, F.cross_entropy, x, y, self.epoch)
            logits = self.forward(x)  # (m, classes), float32
            if bn is not None:
                bn.after()
            loss_sum = F.cross_entropy(logits, y, reduction="sum", label_smoothing=self.cfg.label_smoothing)
            # Divide by the GLOBAL batch: summed over micro-batches and ranks this is the mean.
            (loss_sum / G).backward()
            stats[0] += loss_sum.detach()
            stats[1] += (logits.argmax(1) == y).sum()
            stats[2] += y.numel()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        if self.comm.size > 1:
            reduced = self.comm.allreduce_sum([*grads, stats, *([bn.payload()] if bn is not None else [])])
            if bn is not None:
                bn.finish(reduced.pop())
        else:  # a world of one has nothing to sum (hvd.DistributedOptimizer skips it too)
            reduced = [*grads, stats]
        for p, g in zip(self.params, reduced[:-1]):
            if g is not p.grad:  # the summed gradient (world > 1) or zeros (unused): take it, no copy
                p.grad = g
        if self.cfg.clip_grad_norm is not None:
            # The summed gradient, the same on every rank: clipped as one process clips its batch's.
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.clip_grad_norm)
        self.optimizer.step()
        self._epoch_sums += reduced[-1]
        self.sampler.advance(G)
        self.updates += 1
        self.samples_seen += G
        return True

    def _running_stats(self) -> RunningStats | None:
        """The BatchNorm running-statistics exchange, on more than one rank and with BatchNorm
        layers to keep (a world of one updates them as they should be already)."""
        if self.comm.size == 1:
            return None
        if self._bn_stats is None:
            self._bn_stats = RunningStats(self.model)
        return self._bn_stats if self._bn_stats.layers else None

    # --- epoch-end pieces ----------------------------------------------------------------------------
    def eig_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The estimate's data: eig_samples training samples from (seed, epoch), in batches of EIG_BATCH.

        Identical on every rank (the second-order engine shards them), independent of the world size.
        """
        n = self.sampler.num_samples
        k = min(self.cfg.eig_samples, n)
        if k < self.cfg.eig_samples and not self._warned_eig_samples:
            log.warning("--eig-samples %d exceeds the %d training samples: using all of them",
                        self.cfg.eig_samples, n)
            self._warned_eig_samples = True
        gen = torch.Generator().manual_seed((self.cfg.seed * 7_919 + 104_729 * (self.epoch + 1)) % (2**63 - 1))
        idx = torch.randperm(n, generator=gen)[:k]
        b = EIG_BATCH
        return [(self.data.train_x[idx[i:i + b]].to(self.device), self.data.train_y[idx[i:i + b]].to(self.device))
                for i in range(0, k, b)]

    def estimate_eig(self) -> tuple[float | None, int, float]:
        """(top eigenvalue, samples used, seconds) or (None, 0, 0.0) when no estimate is needed."""
        if self.cfg.method == "sgd" or not self.controller.needs_estimate:
            # sgd never grows, and at the cap there is nothing left to decide: spend no HVPs.
            return None, 0, 0.0
        if self.eigen_fn is None:
            self.eigen_fn = _default_eigen_fn()
        t0 = time.perf_counter()
        batches = self.eig_batches()
        criterion = nn.CrossEntropyLoss(label_smoothing=self.cfg.label_smoothing)  # the loss trained on
        result = self.eigen_fn(self.model, criterion, batches, tol=self.cfg.eig_tol,
                               max_iter=self.cfg.eig_max_iter, method=self.cfg.eig_method,
                               seed=self.cfg.seed + self.epoch, comm=self.comm)
        eig = float(result.eigenvalues[0])
        return eig, sum(int(y.numel()) for _, y in batches), time.perf_counter() - t0

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """(test loss, test accuracy) over the whole test split, each rank its shard, sums allreduced."""
        self.model.eval()
        x_all, y_all = self.data.test_x, self.data.test_y
        shard = torch.arange(self.comm.rank, int(y_all.shape[0]), self.comm.size)
        sums = torch.zeros(3, dtype=torch.float64)  # loss_sum, correct, count
        for i in range(0, shard.numel(), self.cfg.eval_batch):
            sel = shard[i:i + self.cfg.eval_batch]
            x, y = x_all[sel].to(self.device), y_all[sel].to(self.device)
            logits = self.forward(x)
            sums += torch.tensor([F.cross_entropy(logits, y, reduction="sum").item(),
                                  (logits.argmax(1) == y).sum().item(), y.numel()], dtype=torch.float64)
        (total,) = self.comm.allreduce_sum([sums])
        loss_sum, correct, count = total.tolist()
        return loss_sum / max(count, 1), correct / max(count, 1)

    # --- the loop ----------------------------------------------------------------------------------
    def run_epoch(self, writer: MetricsWriter, show_progress: bool = True,
                  on_record: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Train the rest of the current epoch, then estimate, evaluate, log (and hand the epoch's
        line to `on_record` on rank 0) and decide growth."""
        epoch = self.epoch
        G = self.controller.global_batch
        adv_ratio = self.adv.ratio(epoch) if self.cfg.method == "absa" else 0.0
        clock = self._epoch_clock
        if clock["start"] is None:
            clock["start"] = time.time()
        bar = _progress(self.sampler.steps_left(G), f"epoch {epoch + 1}/{self.cfg.epochs} G={G}",
                        show_progress and self.comm.rank == 0 and not self.cfg.quiet)
        lr = self.current_lr()  # reported as is when the epoch has no full batch left
        mark = time.perf_counter()
        while self.step():
            now = time.perf_counter()
            clock["train_s"] += now - mark  # this update and the previous one's hooks (commits)
            clock["world"] = self.comm.size
            mark = now
            lr = self.optimizer.param_groups[0]["lr"]  # the LR of the epoch's last update
            if bar is not None:
                bar.update(1)
            if self.on_step is not None:
                self.on_step()
        clock["train_s"] += time.perf_counter() - mark
        if bar is not None:
            bar.close()
        # Running statistics are the same on every rank already (RunningStats), except for layers
        # it leaves alone (momentum=None) and other buffers: rank 0's everywhere.
        self.comm.broadcast_buffers(self.model)
        eig, eig_samples, so_s = self.estimate_eig()
        test_loss, test_acc = self.evaluate()
        loss_sum, correct, count = self._epoch_sums.tolist()
        epoch_s = time.time() - clock["start"]
        self.elapsed_s += epoch_s
        self.second_order_total_s += so_s
        # The world of the epoch's last update: after a resize at the epoch's end, this epoch's
        # updates still ran in the old world.
        world = clock["world"] or self.comm.size
        lay = layout(G, self.cfg.base_batch, world)
        record = writer.epoch(
            epoch=epoch + 1, updates=self.updates, samples_seen=self.samples_seen, global_batch=G,
            world_size=world, per_worker_batch=lay.per_worker_batch, accum_steps=lay.accum_steps,
            lr=lr, eig=eig, eig_samples=eig_samples, adv_ratio=adv_ratio,
            train_loss=loss_sum / max(count, 1), train_acc=correct / max(count, 1),
            test_loss=test_loss, test_acc=test_acc, epoch_s=epoch_s,
            samples_per_s=(self.samples_seen - clock["samples0"]) / max(clock["train_s"], 1e-9),
            second_order_s=so_s)
        self.history.append(record)
        if on_record is not None and self.comm.rank == 0:
            # Before the epoch-end hook: its commit may raise to resize the job, and the line
            # would then never be shown (it is written to metrics.jsonl already).
            on_record(record)
        # The next epoch starts now, on the clock that the epoch-end commit keeps: a resize at
        # this boundary (the commit raises, the job resets) then stalls inside the next epoch's
        # time instead of between two clocks.
        self._epoch_clock = {**_new_epoch_clock(self.samples_seen), "start": time.time()}
        grew = False
        if self.cfg.method != "sgd":
            if epoch + 1 < self.cfg.epochs:
                grew = self._decide(writer, eig, epoch)
            else:  # a growth after the last epoch would apply to nothing, unless the run is extended
                self._pending_check = {"eig": eig, "epoch": epoch}
        self._epoch_sums.zero_()
        self.sampler.new_epoch()
        if self.on_epoch_end is not None:
            self.on_epoch_end(grew)
        return record

    def _decide(self, writer: MetricsWriter, eig: float | None, epoch: int) -> bool:
        """The controller's decision after `epoch` (0-based), with its growth event; True if it grew."""
        decision = self.controller.check(eig, epoch)
        if not decision.grew:
            return False
        self.adv.on_growth(self.controller.at_max)
        growth = writer.event("growth", epoch=epoch + 1, updates=self.updates,
                              old_batch=decision.old_batch, new_batch=decision.new_batch,
                              reason=decision.reason, eig=eig, ref=decision.ref,
                              lr=self.lr_schedule.at(self.controller, epoch + 1, 0.0))
        self.growths.append(growth)
        return True

    def fit(self, writer: MetricsWriter, on_epoch: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Run the remaining epochs (or up to --stop-at-update); returns the summary (written to
        summary.json on rank 0)."""
        if self._pending_check is not None and self.epoch < self.cfg.epochs:
            # A finished run resumed with more epochs: its last epoch's check, skipped then, comes
            # now, so it grows as a run planned this long from the start would have.
            grew = self._decide(writer, **self._pending_check)
            self._pending_check = None
            if self.on_epoch_end is not None:
                self.on_epoch_end(grew)
        while self.epoch < self.cfg.epochs:
            try:
                self.run_epoch(writer, on_record=on_epoch)
            except StopRequested:
                break
        summary = self.summary()
        writer.summary(**summary)
        return summary

    # --- disk checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self, writer: MetricsWriter) -> Path | None:
        """Rank 0 writes the whole state (and torch's RNG) atomically to <out>/checkpoints/."""
        if self.comm.rank != 0:
            return None
        from hvd_abs.elastic.checkpoint import save_checkpoint, to_host

        t0 = time.perf_counter()
        state = to_host({**self.state_dict(), "rng": torch.get_rng_state(), "config": saved_config(self.cfg),
                         "data": self.data_id})
        path = save_checkpoint(Path(self.cfg.out).expanduser() / CHECKPOINT_DIR, state, self.updates)
        writer.event("checkpoint", epoch=self.epoch, updates=self.updates, path=str(path),
                     seconds=time.perf_counter() - t0)
        return path

    def resume(self, run_dir: str | os.PathLike, collective: bool = True) -> Path:
        """Load the newest checkpoint of `run_dir` that verifies. collective: rank 0 reads and
        broadcasts it; else every rank reads it (elastic jobs, where no collective may run before
        the elastic loop, which then syncs from rank 0 anyway)."""
        found = read_newest_checkpoint(run_dir) if (self.comm.rank == 0 or not collective) else None
        if collective:
            found = self.comm.broadcast_object(found)
        path, state = found
        saved = _with_planned_epochs(state)  # None: a checkpoint from before configs were kept
        state.pop("config", None)
        error = resume_mismatch_error(run_dir, self.cfg, saved) if saved is not None else None
        if error:
            raise error
        saved_data = state.pop("data", None)  # (None: from before data were identified)
        differ = [f"{k} {self.data_id.get(k)} (the run had {v})" for k, v in (saved_data or {}).items()
                  if self.data_id.get(k) != v]
        if differ:
            raise UserError(f"--resume {run_dir}: the run trained on other data: {'; '.join(differ)}: give it the "
                            f"data it was started with (the options that choose them), or start a new run "
                            f"without --resume")
        before = (copy.deepcopy(self.state_dict()), torch.get_rng_state())
        try:
            torch.set_rng_state(state.pop("rng"))
            self.load_state_dict(state)
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            # Another model, data subset or method: leave this trainer as it was (a caller may
            # start over with it) and name the flags that must match.
            self.load_state_dict(before[0])
            torch.set_rng_state(before[1])
            # load_state_dict says "Error(s) in loading state_dict for X:" and then one line each.
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            reason = " ".join((lines[1] if len(lines) > 1 else lines[0] if lines else type(exc).__name__).split())
            which = ("give it the model the run trained (the same class, built with the same options: a "
                     "script's own too)" if self.own_model else
                     "pass the --model, --dataset, --method and --train-subset the run was started with")
            raise UserError(f"--resume {run_dir}: checkpoint {Path(path).name} does not fit this run "
                            f"({reason[:300]}); {which}, or another --out for a new run") from None
        if saved is not None:
            # What follows --epochs follows this run's --epochs, which a resume may change: the
            # default decay epochs (E/3, 2E/3), the cosine's length and ABSA's stop at E/2. (The
            # options that shape them define the run: checked above to be the run's own. A
            # checkpoint without them keeps its schedules as they were.)
            self.lr_schedule.schedule = self.cfg.lr_schedule
            self.lr_schedule.decay_epochs = self.cfg.decay_epochs()
            self.lr_schedule.total_epochs = self.cfg.epochs
            self.adv.total_epochs = self.cfg.epochs
        # A checkpoint taken mid-epoch (--stop-at-update) carries the epoch's start on the clock
        # of the process that wrote it: count the time until then as its training time only.
        if self._epoch_clock["start"] is not None:
            self._epoch_clock["start"] = time.time() - self._epoch_clock["train_s"]
        log.info("resumed from %s at epoch %d, %d updates", path, self.epoch, self.updates)
        return Path(path)

    def summary(self) -> dict[str, Any]:
        """The run's outcome in one flat-ish dict."""
        last = self.history[-1] if self.history else {}
        return {
            "method": self.cfg.method, "dataset": self.dataset_name, "model": self.model_name,
            "own_model": self.own_model, "num_classes": int(self.data.num_classes),
            "in_shape": list(self.data.train_x.shape[1:]),
            "epochs": len(self.history), "updates": self.updates, "samples_seen": self.samples_seen,
            "initial_batch": self.controller.initial_batch, "final_batch": self.controller.global_batch,
            "max_batch": self.controller.max_batch, "num_growths": self.controller.num_growths,
            "growths": [{k: g[k] for k in ("epoch", "updates", "old_batch", "new_batch", "reason")}
                        for g in self.growths],
            "world_size": self.comm.size, "final_lr": last.get("lr"),
            "final_test_acc": last.get("test_acc"),
            "best_test_acc": max((h["test_acc"] for h in self.history), default=None),
            "final_train_acc": last.get("train_acc"), "total_s": self.elapsed_s,
            "second_order_s": self.second_order_total_s,
            "second_order_share": self.second_order_total_s / self.elapsed_s if self.elapsed_s else None,
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self.cfg).items()},
        }


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
        old = [path / name for name in (*RUN_FILES, *RUN_DIRS) if (path / name).exists()]
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


def open_writer(out: Path, cfg: TrainConfig, rank: int) -> MetricsWriter:
    """The run's metrics writer (it refuses a damaged metrics.jsonl before anything changes). A
    run resumed in its folder then drops its model.pt, no longer the weights where the run ends
    (the checkpoints keep them), so a crash on the way leaves none behind; finish writes anew."""
    writer = MetricsWriter(out, enabled=rank == 0)
    if rank == 0 and cfg.resumes_in_place:
        (out / WEIGHTS_FILE).unlink(missing_ok=True)
    return writer


def train(cfg: TrainConfig, comm: Any = None, eigen_fn: EigenFn | None = None,
          on_epoch: Callable[[dict[str, Any]], None] | None = None, plot: bool = True,
          model: nn.Module | Callable[[], nn.Module] | None = None, data: Any = None) -> dict[str, Any]:
    """Validate, set up, train, and write metrics.jsonl, summary.json and plots.png (rank 0).
    model, data: as for Trainer (default: cfg.model on cfg.dataset).

    Nothing is written before the config, the data and the model were all accepted.
    """
    if cfg.elastic:
        from hvd_abs.elastic.job import train_elastic

        return train_elastic(cfg, eigen_fn=eigen_fn, on_epoch=on_epoch, plot=plot, model=model, data=data)
    if comm is None:
        from hvd_abs.comm import make_comm

        comm = make_comm("auto")
    trainer = Trainer(cfg, comm=comm, eigen_fn=eigen_fn, model=model, data=data)
    resumed_from = None
    if cfg.resume is not None:
        resumed_from = trainer.resume(cfg.resume)
        refuse_finished(trainer)
    out = Path(cfg.out).expanduser()
    with run_lock(out) if comm.rank == 0 else contextlib.nullcontext():  # (rank 0 alone writes there)
        if comm.rank == 0:
            # Again, now that no other run can: one may have finished here since validate() looked.
            check_out_dir(out, cfg.overwrite or cfg.resumes_in_place, resuming=cfg.resume is not None)
            prepare_out_dir(out, cfg.replaces_out)
            if cfg.resumes_in_place:  # lines of an attempt after the checkpoint: redone now
                cut_back(out, trainer.epoch, trainer.updates)
        writer = open_writer(out, cfg, comm.rank)
        if resumed_from is not None and not cfg.resumes_in_place:
            record_history(trainer, writer)
        trainer.on_epoch_end = lambda grew: checkpoint_if_due(trainer, writer)
        try:
            summary = trainer.fit(writer, on_epoch=on_epoch)
            trainer.save_checkpoint(writer)
        finally:
            writer.close()
        if resumed_from is not None:  # which checkpoint it continued from (a damaged newest is skipped)
            summary["resumed_from"] = str(resumed_from)
        return finish(trainer, summary, writer, out, plot)


def elastic_resets(out: Path) -> list[dict[str, Any]]:
    """The run's elastic resets (a join or leave: "resize"; a lost worker: "failure") from its
    metrics.jsonl, each with its epoch, update, new world size and stall; [] for a fixed world."""
    from hvd_abs.metrics import read_metrics

    if not (out / METRICS_FILE).exists():
        return []
    _, events = read_metrics(out)
    return [{k: e.get(k) for k in ("event", "epoch", "updates", "world_size", "stall_s")}
            for e in events if e["event"] in ("resize", "failure")]


def save_weights(model: nn.Module, path: Path) -> Path:
    """The model's state_dict, on the host, as a plain torch file written atomically: loadable
    without hvd_abs (torch.load(path, weights_only=True)), unlike the checksummed checkpoints."""
    from hvd_abs.elastic.checkpoint import to_host

    state = to_host(model.state_dict())
    return write_atomic(path, lambda fh: torch.save(state, fh))


def read_newest_checkpoint(run_dir: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """(path, state) of the newest checkpoint of `run_dir` that verifies; UserError if none."""
    from hvd_abs.elastic.checkpoint import load_latest

    found = load_latest(Path(run_dir).expanduser() / CHECKPOINT_DIR)
    if found is None:
        raise UserError(f"--resume {run_dir}: no checkpoint there verifies (all missing or damaged); "
                        f"start a new run with another --out")
    return str(found[0]), found[1]


def refuse_finished(trainer: Trainer) -> None:
    """After a resume: a run that already reached --epochs has nothing left to train (rewriting
    its summary, plots and weights from the same state would be all it did)."""
    if trainer.epoch >= trainer.cfg.epochs:
        raise UserError(f"--resume {trainer.cfg.resume}: that run already reached epoch {trainer.epoch}; pass "
                        f"--epochs above {trainer.epoch} to train it further")


def record_history(trainer: Trainer, writer: MetricsWriter) -> None:
    """Write the epochs and growths a resumed run brings (its state holds them) into a new
    folder's metrics, so that folder records the whole run: the table, the summary and the plots
    then agree. (The old folder's resize and failure events are not in the state.) Idempotent:
    the writer skips epochs and growths it has."""
    for record in trainer.history:
        writer.epoch(**record)
    for growth in trainer.growths:
        writer.event("growth", **{k: v for k, v in growth.items() if k != "event"})


def checkpoint_if_due(trainer: Trainer, writer: MetricsWriter) -> None:
    """After an epoch's bookkeeping: a disk checkpoint every --checkpoint-every epochs."""
    every = trainer.cfg.checkpoint_every
    if every and trainer.epoch % every == 0 and trainer.epoch < trainer.cfg.epochs:
        trainer.save_checkpoint(writer)


def finish(trainer: Trainer, summary: dict[str, Any], writer: MetricsWriter, out: Path, plot: bool) -> dict[str, Any]:
    """Rank 0: model.pt, plots.png and the final summary.json."""
    if trainer.comm.rank != 0:
        return summary
    summary["weights"] = str(save_weights(trainer.model, out / WEIGHTS_FILE))
    summary["resets"] = elastic_resets(out)
    if plot:
        if trainer.history:  # a run stopped before its first epoch end has nothing to draw
            from hvd_abs.plotting import plot_run

            summary["plot"] = str(plot_run(out))
        summary["metrics"] = str(out / METRICS_FILE)
    writer.summary(**summary)
    shutil.rmtree(out / REPLACED_DIR, ignore_errors=True)  # the new run is whole: the one it replaced can go
    return summary
