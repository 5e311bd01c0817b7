"""TrainConfig: every setting of a run, its default, and its validation (in `validate`, the one
place; the CLI's options are made from these fields by training/options.py)."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from hvd_abs.batching.controller import TRIGGERS, trigger_name
from hvd_abs.batching.lr import SCALINGS, SCHEDULES
from hvd_abs.errors import UserError
from hvd_abs.loggers import LOGGERS, logger_available
from hvd_abs.training.optimizers import MOMENTUM_OPTIMIZERS, OPTIMIZERS
from hvd_abs.training.run_dir import CHECKPOINT_DIR, RELAY_ENV, check_out_dir, checkpoints_of


# (Imported when asked: both modules import torch, and `hvd-abs --help` should not.)
def _augments() -> tuple[str, ...]:
    from hvd_abs.augment import AUGMENTS

    return AUGMENTS


def _loadings() -> tuple[str, ...]:
    from hvd_abs.data.sources import LOADINGS

    return LOADINGS


def _precisions() -> tuple[str, ...]:
    from hvd_abs.precision import PRECISIONS

    return PRECISIONS

METHODS = ("sgd", "abs", "absa")
EIG_METHODS = ("stochastic", "lanczos", "power")
DEVICES = ("cpu", "cuda")
DEFAULT_MODELS = {"digits": "cnn", "cifar10": "resnet20", "cifar100": "resnet20", "svhn": "resnet20",
                  "imagefolder": "tv:resnet18"}

# Chosen by benchmarks/bench_eig_trigger.py (results in benchmarks/results/eig_trigger.json):
# streaming power iteration over 8 fresh 128-sample batches (2 burn-in, 6 averaged). On CIFAR-10
# ResNet-20 its spread over seeds (std/mean) was about a fifth of the reference's single-batch
# estimate, at about 7% of an epoch's time on this 2-core CPU.
DEFAULT_EIG_SAMPLES = 1024
DEFAULT_EIG_METHOD = "stochastic"
DEFAULT_EIG_TOL = 1e-2
EIG_BATCH = 128  # samples per Hessian-vector product batch, as the reference (not --base-batch)
DEFAULT_EIG_MAX_ITER = 10


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def option(default: Any, help: str, group: str, **cli: Any) -> Any:
    """A TrainConfig field that is also an `hvd-abs train` option (training/options.py makes the
    click option from it). cli: choices (a callable giving them, so a registry's later entries
    count), hidden, metavar, multiple, flag (the option's name, when not the field's)."""
    return field(default=default, metadata={"help": help, "group": group, **cli})


@dataclass
class TrainConfig:
    """Every option of `hvd-abs train`, with its default (see `option`'s help texts)."""

    # data
    dataset: str = option("digits", "digits (offline), cifar10, cifar100, svhn, imagefolder.", "data")
    data_dir: str | None = option(None, "Data folder (required for imagefolder).", "data")
    download: bool = option(False, "Download a missing torchvision data set.", "data")
    train_subset: int | None = option(None, "Train on a fixed random subset of this many training samples "
                                            "(quick experiments).", "data")
    test_subset: int | None = option(None, "Evaluate on a fixed random subset of the test split.", "data")
    augment: str = option("none", "Training images randomly cropped (zero padding of 1/8 the side: 4 px at 32) "
                                  "and/or mirrored left-right, per sample from (seed, epoch, index): the same on any "
                                  "number of workers. crop-flip is the usual Cifar recipe; none is the paper's; rrc-flip "
                                  "(streamed folders) is ImageNet's random-resized crop and flip.",
                          "data", choices=_augments)
    image_size: int | None = option(None, "Image-folder images resized: shorter side to N, centre N x N crop (224 "
                                          "for ImageNet); default: the images' own size.", "data")
    data_loading: str = option("auto", "Image folders: memory (decoded once into a uint8 cache), stream (each "
                                       "worker decodes only its micro-batches, in background processes: for data "
                                       "larger than RAM; --augment rrc-flip), auto (memory when it fits). A script passes it on as "
                                       "splits_from_datasets(..., loading=cfg.data_loading).",
                               "data", choices=_loadings)
    loader_workers: int = option(2, "Background processes per worker decoding a streamed data set's next "
                                    "micro-batches (0: in the training process).", "data")
    # model
    model: str = option("auto", "mlp, cnn, c1, resnet20, tv:<torchvision name>; auto: cnn for digits, resnet20 "
                                "for CIFAR/SVHN.", "model")
    precision: str = option("fp32", "bf16 / fp16: training and test forward passes under torch.autocast to "
                                    "bfloat16 / float16, fp16 with loss scaling (weights, gradients, optimizer and "
                                    "the growth check's Hessian stay float32).",
                            "model", choices=_precisions)
    device: str = option("cpu", "Where each worker trains.", "model", choices=lambda: DEVICES)
    threads: int | None = option(None, "torch threads per worker (default: torch's choice for 1 worker, cores / "
                                       "workers else).", "model")
    seed: int = option(0, "Seed of the weights, the sample order, FGSM and the estimates: the same run on any "
                          "number of workers.", "model")
    # method
    method: str = option("absa", "sgd: fixed batch; abs: adaptive batch; absa: adaptive batch + FGSM "
                                 "adversarial samples.", "method", choices=lambda: METHODS)
    base_batch: int = option(128, "Micro-batch per worker and accumulation step (what BatchNorm sees).", "method")
    batch: int | None = option(None, "Initial global batch (sgd: the fixed one, reached by accumulation). "
                                     "Default: --base-batch.", "method")
    max_batch: int = option(16384, "Cap of the global batch.", "method")
    growth_trigger: str = option("hessian", "What doubles the batch (abs, absa): hessian: the top Hessian eigenvalue "
                                            "halved since the last growth, or --duration checks without that (the "
                                            "paper's); schedule: every --duration epochs, with no Hessian estimate; "
                                            "gns: the epoch's gradient noise scale at least twice the batch, or "
                                            "--duration checks without that (needs --batch >= 2 x --base-batch to "
                                            "measure it).", "method", choices=lambda: tuple(TRIGGERS))
    duration: int = option(10, "Grow anyway after this many eigenvalue checks without growth (the first check "
                               "only sets the reference: with 1, the first growth comes after epoch 2).", "method")
    adv_eps: float = option(0.005, "FGSM step on the [0,1] pixel scale.", "method")
    adv_ratio: float = option(0.2, "Share of each micro-batch replaced by FGSM inputs (absa), halved at each "
                                   "growth.", "method")
    # schedule
    epochs: int = option(90, "Epochs to train.", "schedule")
    lr: float = option(0.1, "LR at the initial batch.", "schedule")
    lr_schedule: str = option("step", "step: x --lr-decay at --lr-decay-epochs (the paper's); cosine: "
                                      "(1 + cos(pi t / E)) / 2 over the run, updated every step. Both multiply the "
                                      "growth scaling and warm-up.", "schedule", choices=lambda: tuple(SCHEDULES))
    lr_decay: float = option(0.2, "Step-decay factor.", "schedule")
    lr_decay_epochs: Sequence[int] | None = option(None, "Comma-separated epochs of step decay (default: E/3 and "
                                                         "2E/3, i.e. 30,60 for 90 epochs).", "schedule")
    lr_scaling: str = option("linear", "LR change per doubling of the batch: x2, x sqrt(2), or none.", "schedule",
                             choices=lambda: tuple(SCALINGS))
    warmup_epochs: float = option(0.0, "Linear LR ramp over this many epochs at the start and after each growth "
                                       "(0: off).", "schedule")
    lr_cap: float | None = option(None, "Upper bound of the LR (default: none).", "schedule")
    optimizer: str = option("sgd", "sgd, adamw (torch's), lars or lamb (timm's; per-layer trust ratios for large "
                                   "batches).", "schedule", choices=lambda: tuple(OPTIMIZERS))
    momentum: float = option(0.9, "Momentum of sgd and lars.", "schedule")
    nesterov: bool = option(False, "Nesterov momentum (sgd, lars).", "schedule")
    weight_decay: float = option(0.0, "Weight decay of the optimizer (decoupled for adamw and lamb).", "schedule")
    label_smoothing: float = option(0.0, "Of the training loss (and of the Hessian the growth check estimates); "
                                         "the test loss is plain.", "schedule")
    clip_grad_norm: float | None = option(None, "Clip the global batch's gradient to this L2 norm before each "
                                                "update (default: no clipping).", "schedule")
    # second order
    eig_samples: int = option(DEFAULT_EIG_SAMPLES, "Training samples for the epoch-end top-eigenvalue estimate, "
                                                   "in batches of 128.", "second order")
    eig_method: str = option(DEFAULT_EIG_METHOD, "stochastic: streaming power iteration, one product per batch; "
                                                 "lanczos/power: top_eigenvalues on all samples at once (power on "
                                                 "128 samples = the reference).", "second order",
                             choices=lambda: EIG_METHODS)
    eig_tol: float = option(DEFAULT_EIG_TOL, "Relative tolerance of the eigenvalue iteration.", "second order")
    eig_max_iter: int = option(DEFAULT_EIG_MAX_ITER, "Most iterations of the eigenvalue estimate.", "second order")
    # elastic
    elastic: bool = option(False, "Run as a worker of an elastic job (horovodrun --min-np/--max-np or `launch "
                                  "ray`): commits, resizes and failures handled; use `hvd-abs launch` to start one.",
                           "elastic")
    max_np: int = option(1, "Elastic: most workers; the job asks for min(max-np, global batch / base batch).",
                         "elastic")
    commit_every: int = option(10, "Elastic: updates between in-memory state commits (also at every growth and "
                                   "epoch end).", "elastic")
    # output
    out: str | None = option(None, "Run directory (default: a new runs/<date>-<time>, printed at the start).",
                             "output")
    overwrite: bool = option(False, "Replace the run already in --out (kept in OUT/.replaced-run until the new run "
                                    "finishes).", "output")
    resume: str | None = option(None, "Continue the run in DIR from its newest good checkpoint (OUT defaults to "
                                      "DIR).", "output", metavar="DIR")
    checkpoint_every: int = option(0, "Epochs between disk checkpoints in OUT/checkpoints (0: only at the end).",
                                   "output")
    keep_checkpoints: int = option(3, "Checkpoints kept in OUT/checkpoints (the newest; OUT/checkpoints/last.pt "
                                      "links to the newest).", "output")
    log_every: int = option(50, "Print a progress line (epoch, update, batch, loss, samples/s, ETA) every N updates "
                                "when stderr is not a terminal, as under the launchers (0: none; a terminal gets "
                                "the bar).", "output")
    quiet: bool = option(False, "No progress bar and no per-epoch lines.", "output")
    eval_batch: int = option(1024, "Samples per forward pass of the test evaluation.", "output")
    callbacks: Sequence[str] = option((), "MODULE:NAME of a hvd_abs Callback class (or a function making one) to "
                                          "add to the run; repeatable.", "output", multiple=True,
                                      metavar="MODULE:NAME", flag="callback")
    loggers: Sequence[str] = option((), "Also write the metrics as csv (OUT/metrics.csv) or tensorboard "
                                        "(OUT/tensorboard/); repeatable. metrics.jsonl is always written.",
                                    "output", multiple=True, flag="logger", choices=lambda: tuple(LOGGERS))
    stop_at_update: int | None = option(None, "Checkpoint and stop after this many updates (restart benchmarks).",
                                        "output", hidden=True)

    @property
    def initial_batch(self) -> int:
        return self.base_batch if self.batch is None else self.batch

    def decay_epochs(self) -> list[int]:
        """The step-decay epochs (explicit, or E/3 and 2E/3 when not given; none for a schedule
        without step decay, as cosine)."""
        if not SCHEDULES[self.lr_schedule].step_decay:
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
        # (a larger one would overflow inside the first update, after the out dir was made).
        if not 0 < self.lr <= 1e6:
            raise UserError(f"--lr must be a positive number up to 1e6, got {self.lr}")
        if not 0 < self.lr_decay <= 1:
            raise UserError(f"--lr-decay must be in (0, 1] (1 = no decay), got {self.lr_decay}")
        if self.lr_schedule not in SCHEDULES:
            raise UserError(f"--lr-schedule must be one of {', '.join(SCHEDULES)}, got {self.lr_schedule!r}")
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
        if not SCHEDULES[self.lr_schedule].step_decay and (self.lr_decay_epochs is not None
                                                           or self.lr_decay != TrainConfig.lr_decay):
            flag = "--lr-decay-epochs" if self.lr_decay_epochs is not None else "--lr-decay"
            raise UserError(f"{flag} belongs to the step schedule, but --lr-schedule is {self.lr_schedule}: "
                            f"drop one of them")
        if self.lr_scaling not in SCALINGS:
            raise UserError(f"--lr-scaling must be one of {', '.join(SCALINGS)}, got {self.lr_scaling!r}")
        if not (self.warmup_epochs >= 0 and math.isfinite(self.warmup_epochs)):
            raise UserError(f"--warmup-epochs must be a finite number >= 0, got {self.warmup_epochs}")
        if self.lr_cap is not None and not self.lr_cap > 0:
            raise UserError(f"--lr-cap must be > 0, got {self.lr_cap}")
        if not 0 <= self.momentum < 1:
            raise UserError(f"--momentum must be in [0, 1), got {self.momentum}")
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.nesterov and self.optimizer not in MOMENTUM_OPTIMIZERS:
            raise UserError(f"--nesterov is for {' and '.join(MOMENTUM_OPTIMIZERS)}, not --optimizer "
                            f"{self.optimizer}: drop --nesterov")
        if self.nesterov and self.momentum == 0:
            raise UserError("--nesterov needs momentum: pass --momentum above 0 (e.g. 0.9), or drop --nesterov")
        if not 0 <= self.label_smoothing < 1:
            raise UserError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.clip_grad_norm is not None and not (self.clip_grad_norm > 0 and math.isfinite(self.clip_grad_norm)):
            raise UserError(f"--clip-grad-norm must be a finite number > 0, got {self.clip_grad_norm}: "
                            f"leave it out for no clipping")
        if not 0 <= self.weight_decay <= 1e6:  # (as --lr: larger overflows float32)
            raise UserError(f"--weight-decay must be a number from 0 to 1e6, got {self.weight_decay}")
        if self.precision not in _precisions():
            raise UserError(f"--precision must be one of {', '.join(_precisions())}, got {self.precision!r}")
        if self.augment not in _augments():
            raise UserError(f"--augment must be one of {', '.join(_augments())}, got {self.augment!r}")
        if self.data_loading not in _loadings():
            raise UserError(f"--data-loading must be one of {', '.join(_loadings())}, got {self.data_loading!r}")
        if self.image_size is not None:
            positive(self.image_size, "--image-size")
        if not isinstance(self.loader_workers, int) or self.loader_workers < 0:
            raise UserError(f"--loader-workers must be an integer >= 0, got {self.loader_workers!r}")
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
            if self.threads > 4096:  # (torch takes a C int)
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
        positive(self.keep_checkpoints, "--keep-checkpoints")
        if not isinstance(self.log_every, int) or isinstance(self.log_every, bool) or self.log_every < 0:
            raise UserError(f"--log-every must be a whole number >= 0 (0: no lines), got {self.log_every!r}")
        if self.resume is not None and not checkpoints_of(self.resume).is_dir():
            raise UserError(f"--resume {self.resume}: no {CHECKPOINT_DIR}/ folder there; pass the --out "
                            f"directory of the run to continue")
        self.growth_trigger = trigger_name(self.growth_trigger)
        if self.growth_trigger not in TRIGGERS:
            raise UserError(f"--growth-trigger must be one of {', '.join(TRIGGERS)}, got {self.growth_trigger!r}")
        if TRIGGERS[self.growth_trigger].needs_noise_scale and self.method != "sgd" \
                and (self.batch or self.base_batch) < 2 * self.base_batch:
            raise UserError(f"--growth-trigger {self.growth_trigger} compares micro-batches of --base-batch with the "
                            f"global batch, so it needs --batch at least 2 x --base-batch ({2 * self.base_batch}); "
                            f"pass a larger --batch or a smaller --base-batch")
        if isinstance(self.loggers, str) or not all(name in LOGGERS for name in self.loggers):
            raise UserError(f"--logger takes one of {', '.join(LOGGERS)} per use, got {self.loggers!r}")
        self.loggers = tuple(dict.fromkeys(self.loggers))  # (each once: two would write one file twice)
        missing = [name for name in self.loggers if not logger_available(name)]
        if missing:
            raise UserError(f"--logger {missing[0]} needs the {missing[0]} package: pip install "
                            f"\"hvd_abs[{missing[0]}]\" (or drop --logger {missing[0]})")
        if isinstance(self.callbacks, str) or not all(isinstance(c, str) and ":" in c for c in self.callbacks):
            raise UserError(f"--callback takes MODULE:NAME (e.g. mypkg.hooks:LogToFile), got {self.callbacks!r}")
        if self.device not in DEVICES:
            raise UserError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not _cuda_available():
            raise UserError("--device cuda was asked but no CUDA device is visible: pass --device cpu")
        if self.out is None and self.resume is not None:
            self.out = self.resume  # a resume goes on in the run's own folder
        if self.out is None:
            return  # a new folder, made when the run starts (Session.run)
        if not str(self.out).strip():
            raise UserError("--out is empty: pass the directory for the run's files")
        # A run dir may be written into when asked (--overwrite), when it is the run being resumed,
        # or when it is the folder of the elastic job this worker belongs to (the launcher made
        # <out>/elastic/ after its own checks). Resuming A into another dir B is a new run in B.
        joins_job = self.elastic and (Path(self.out).expanduser() / "elastic").is_dir()
        if self.elastic and os.environ.get(RELAY_ENV):
            return  # the launcher checked --out on its host, where this worker's outputs go
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
