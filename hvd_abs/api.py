"""Your own model and data: the library entry to the trainer that `hvd-abs train` runs.

    import hvd_abs

    cfg, own = hvd_abs.parse_train_args(parser=my_argparse_parser)   # every `hvd-abs train` option
    data = hvd_abs.splits_from_tensors(train_x, train_y, test_x, test_y)   # or splits_from_datasets,
                                                                          # or hvd_abs.load_dataset
    summary = hvd_abs.fit(cfg, model=MyNet, data=data)   # MyNet() is built on every worker
    net = hvd_abs.load_model(summary["out"], model=MyNet)  # the trained weights (OUT/model.pt)

The same script runs as one process, under `horovodrun -np N` (a fixed world), and as every worker
of an elastic job: `hvd-abs launch horovod --script my_train.py -- --out runs/x ...` (or `launch
ray --script`) starts it with `--elastic --max-np N` among its arguments, which parse_train_args
reads like any other train option; the script's own options go to its parser. Bad input raises
`hvd_abs.UserError` naming the fix; `user_errors_exit_2` around the script's main turns it into
one line and exit code 2, as the CLI does (and a launcher then reports it so).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from hvd_abs.data import Splits
from hvd_abs.data.splits import class_count
from hvd_abs.data.dataset_stream import seeded
from hvd_abs.data.streaming import Streamed, take
from hvd_abs.errors import UserError
from hvd_abs.metrics import SUMMARY_FILE
from hvd_abs.elastic.worker import train
from hvd_abs.training.config import TrainConfig
from hvd_abs.training.resume import resumed_options
from hvd_abs.training.run_dir import CHECKPOINT_DIR, WEIGHTS_FILE


def parse_train_args(argv: Sequence[str] | None = None, prog: str | None = None,
                     parser: argparse.ArgumentParser | None = None) -> tuple[TrainConfig, Any]:
    """(TrainConfig, the rest) from `hvd-abs train`'s options in `argv` (default sys.argv[1:]),
    defaults and `--resume`'s saved options filled in, and validated, as the CLI does. The rest:
    the arguments it did not know (a list), or with `parser` (the script's own argparse parser)
    their parse (a Namespace): then an option of that parser that is also a train option is
    refused, and `--help` lists both. A bad value prints one line and exits 2; `--help` exits 0:
    this is a script's command line, not a library call."""
    import click

    from hvd_abs.elastic.outputs_relay import fetch_resume
    from hvd_abs.elastic.worker import command
    from hvd_abs.errors import exit_2
    from hvd_abs.training.options import check_script_extras, config_from_options

    args = list(sys.argv[1:] if argv is None else argv)
    name = prog or Path(sys.argv[0]).name or "train"
    script_command = copy.copy(command)  # hvd-abs train's options, with a script's own --help text
    script_command.help = (f"Train with hvd_abs.fit (fixed batch sgd, adaptive abs/absa): {name} takes every option of "
                           f"`hvd-abs train`, listed here, and its own.")
    if parser is None:
        script_command.epilog = ("The script's own options are not listed here (a script that parses them with "
                                 "argparse lists them with -h).")
    train_names = {o for p in command.params for o in p.opts}
    # (argparse keeps its option strings only in this attribute; -h/--help are its own help.)
    own = set(parser._option_string_actions) - {"-h", "--help"} if parser is not None else set()
    try:
        clash = sorted(own & train_names)
        if clash:
            raise UserError(f"the script's own option {clash[0]} is also an option of hvd-abs train (the script "
                            f"reads it as cfg.{clash[0].lstrip('-').replace('-', '_')}): rename its own")
        ctx = script_command.make_context(name, args, ignore_unknown_options=True, allow_extra_args=True)
        check_script_extras([a for a in ctx.args if a.split("=", 1)[0] not in own])
        fetch_resume(ctx.params)  # (a relayed job's --resume folder is on the launcher's host)
        cfg = config_from_options(ctx.params, ctx)
        # Which options the command line gave: fit resolves a --resume with them (a value equal to
        # the default, --epochs 90, is still given).
        cfg._given_options = frozenset(  # type: ignore[attr-defined]
            n for n in ctx.params if ctx.get_parameter_source(n) not in (None, click.core.ParameterSource.DEFAULT))
        cfg.validate()  # (again when training starts) a bad value is said before the script loads its data
    except click.exceptions.Exit as exc:  # --help: then the script's own options
        if parser is not None:
            click.echo(f"\nOptions of {name} itself:\n" + parser.format_help().split("\n", 1)[1].lstrip("\n"))
        raise SystemExit(exc.exit_code) from None
    except click.ClickException as exc:
        exit_2(exc.format_message())
    except UserError as exc:
        exit_2(str(exc))
    if parser is None:
        return cfg, list(ctx.args)
    # The script's own bad option is a refusal too (one line, exit 2; a launcher reports it so).
    saved_error = parser.error
    parser.error = lambda message: exit_2(f"{parser.prog}: {message}")  # type: ignore[method-assign]
    try:
        return cfg, parser.parse_args(ctx.args)
    finally:
        parser.error = saved_error  # type: ignore[method-assign]


def splits_from_tensors(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                        *, name: str = "custom", num_classes: int | None = None,
                        classes: Sequence[str] = ()) -> Splits:
    """A data set for `fit` from in-memory tensors: x of shape (N, C, ...) (images (N, C, H, W)),
    float in [0, 1] or uint8 (divided by 255); y integer class indices (N,). The models take
    unnormalised inputs (the built-in ones normalise inside with the returned mean and std;
    normalise in your own model, e.g. with `hvd_abs.models.Normalize`). num_classes defaults
    to len(classes), else the largest label + 1. Raises UserError naming what to fix."""
    xs, ys = [], []
    for split, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise UserError(f"{split}_x and {split}_y must be torch tensors, got {type(x).__name__} and "
                            f"{type(y).__name__}: convert them with torch.as_tensor")
        if x.dim() < 2 or len(x) == 0:
            raise UserError(f"{split}_x has shape {tuple(x.shape)}: give one sample per row, (N, C, H, W) for images, "
                            f"with N >= 1")
        if y.dim() != 1 or len(y) != len(x):
            raise UserError(f"{split}_y has shape {tuple(y.shape)} for {len(x)} samples in {split}_x: give one class "
                            f"index per sample, shape ({len(x)},)")
        if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
            raise UserError(f"{split}_y is {y.dtype}: give integer class indices (y.long())")
        if x.dtype == torch.uint8:
            x = x.float().div_(255)
        elif not x.dtype.is_floating_point:
            raise UserError(f"{split}_x is {x.dtype}: give float32 in [0, 1] or uint8 images")
        x = x.float().contiguous()
        if not bool(torch.isfinite(x).all()):
            raise UserError(f"{split}_x holds NaN or infinite values: clean or drop those samples")
        xs.append(x)
        ys.append(y.long().contiguous())
    if xs[0].shape[1:] != xs[1].shape[1:]:
        raise UserError(f"train samples have shape {tuple(xs[0].shape[1:])} but test samples "
                        f"{tuple(xs[1].shape[1:])}: give both splits the same sample shape")
    num_classes = class_count(tuple(ys), num_classes, classes)
    # Per channel (dim 1) over every other dim, as data.channel_stats does for images.
    dims = [0, *range(2, xs[0].dim())]
    var, mean = torch.var_mean(xs[0], dim=dims, correction=0)
    return Splits(train_x=xs[0], train_y=ys[0], test_x=xs[1], test_y=ys[1], num_classes=int(num_classes),
                  in_shape=tuple(int(d) for d in xs[0].shape[1:]), mean=tuple(float(m) for m in mean),
                  std=tuple(float(s) for s in var.sqrt()), name=name, classes=tuple(str(c) for c in classes))


def splits_from_datasets(train: Any, test: Any, *, name: str = "custom", num_classes: int | None = None,
                         classes: Sequence[str] | None = None, loading: str = "auto", batch_size: int = 1024,
                         num_workers: int = 0) -> Splits:
    """A data set for `fit` from two map-style torch Datasets of (input tensor, class index),
    e.g. torchvision data sets with `transforms.ToTensor()` (or PILToTensor(): uint8 is a quarter
    of the memory). The trainer indexes samples by position, so that a resize never repeats or
    skips one. loading: "memory" reads them once, in order, into memory (random transforms are
    then applied once, not per epoch); "stream" reads each worker's own samples when it trains on
    them, in --loader-workers background processes, its random transforms drawn from (seed,
    epoch, index) (hvd_abs.data.dataset_stream); "auto" (default) holds them in memory when they
    take under a quarter of the host's RAM (at most 8 GiB), else streams. Pass cfg.data_loading
    to follow --data-loading. classes: default the train set's `.classes` (or that of the data set
    a Subset is taken from)."""
    from hvd_abs.data.sources import LOADINGS, _memory_budget

    if loading not in LOADINGS:
        raise UserError(f"loading must be one of {', '.join(LOADINGS)}, got {loading!r}")
    sizes = [_dataset_len(split, ds) for split, ds in (("train", train), ("test", test))]
    if classes is None:
        classes = getattr(train, "classes", None) or getattr(getattr(train, "dataset", None), "classes", None) or ()
    if loading == "auto":
        from hvd_abs.data.dataset_stream import input_bytes

        loading = "memory" if sum(sizes) * input_bytes(train) <= _memory_budget() else "stream"
    if loading == "stream":
        from hvd_abs.data.dataset_stream import stream_splits

        return stream_splits(train, test, name=name, num_classes=num_classes, classes=tuple(classes))
    tensors = []
    for split, ds in (("train", train), ("test", test)):
        tensors += _read_dataset(split, ds, batch_size, num_workers)
    return splits_from_tensors(*tensors, name=name, num_classes=num_classes, classes=tuple(classes))


def _dataset_len(split: str, ds: Any) -> int:
    from torch.utils.data import DataLoader

    if isinstance(ds, DataLoader):
        raise UserError(f"the {split} data set is a DataLoader: pass its Dataset (loader.dataset); the samples are "
                        f"read by position")
    try:
        n = len(ds)
    except TypeError:
        raise UserError(f"the {split} data set has no len(): give a map-style torch Dataset "
                        f"(or tensors to splits_from_tensors)") from None
    if n == 0:
        raise UserError(f"the {split} data set is empty: give at least one sample")
    return n


class _Seeded:
    """dataset[i] with the global RNGs seeded from (0, 0, i): random transforms give every rank the
    same inputs (as the streamed path's epoch 0), and the trainer's RNG streams stay untouched."""

    def __init__(self, ds: Any) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> Any:
        with seeded(0, 0, i):
            return self.ds[i]


def _read_dataset(split: str, ds: Any, batch_size: int, num_workers: int) -> list[torch.Tensor]:
    """[x, y] of a whole map-style data set, filled into tensors allocated once (not a list of
    batches and their concatenation: that would hold the data set twice)."""
    from torch.utils.data import DataLoader, default_collate

    n = _dataset_len(split, ds)

    def collate(batch: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        # Only what batching says is turned into a UserError: the data set's own errors (in its
        # __getitem__ or transforms) pass through with their tracebacks.
        if any(not isinstance(s, (tuple, list)) or len(s) != 2 for s in batch):
            raise UserError(f"the {split} data set's samples are not (input, label) pairs: return two items")
        try:
            x, y = default_collate(batch)
        except (TypeError, RuntimeError) as exc:
            raise UserError(f"the {split} data set's inputs cannot be stacked ({' '.join(str(exc).split())[:200]}): "
                            f"make them tensors of one shape (torchvision: transforms.ToTensor())") from None
        if not isinstance(x, torch.Tensor):
            raise UserError(f"the {split} data set's inputs are not tensors: make them tensors "
                            f"(torchvision: transforms.ToTensor())")
        if not isinstance(y, torch.Tensor) or y.dtype.is_floating_point or y.dim() != 1:
            raise UserError(f"the {split} data set's labels are not integer class indices: map them to 0..K-1 "
                            f"(torchvision: target_transform, or dataset.class_to_idx)")
        return x, y

    x_all = y_all = None
    at = 0
    for x, y in DataLoader(_Seeded(ds), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                           collate_fn=collate):
        if x_all is None:
            x_all, y_all = x.new_empty((n, *x.shape[1:])), y.new_empty((n,))
        if x.shape[1:] != x_all.shape[1:] or at + len(x) > n:
            raise UserError(f"the {split} data set's inputs change shape ({tuple(x_all.shape[1:])}, then "
                            f"{tuple(x.shape[1:])}) or outnumber its len(): make them one shape")
        x_all[at:at + len(x)], y_all[at:at + len(y)] = x, y
        at += len(x)
    if at != n:
        raise UserError(f"the {split} data set yielded {at} samples but its len() is {n}: make them agree")
    return [x_all, y_all]


def fit(cfg: TrainConfig | None = None, *, model: nn.Module | Callable[[], nn.Module] | None = None,
        data: Splits | None = None, echo: bool = True, **options: Any) -> dict[str, Any]:
    """Train `model` on `data` by `cfg` (default TrainConfig(); `options` override its fields:
    fit(method="abs", epochs=20, out="runs/x")), as `hvd-abs train` does: alone, under
    horovodrun, or as an elastic worker (cfg.elastic), with the same metrics.jsonl, summary.json,
    plots.png and checkpoints in cfg.out. model: a module, or a class or function making one
    (called on every worker after seeding with cfg.seed; rank 0's weights are broadcast);
    default cfg.model. data: from splits_from_tensors / splits_from_datasets; default
    cfg.dataset. echo: on rank 0, print the epoch lines (unless cfg.quiet) and the final table
    to stderr and stdout as the CLI does. callbacks= takes hvd_abs.Callback objects (run after
    the run's own, on every worker) as well as --callback's MODULE:NAME strings. Returns the
    summary (complete on rank 0)."""
    import click

    from hvd_abs.elastic.outputs_relay import launcher_prints_summary
    from hvd_abs.training.progress import epoch_line, format_summary

    from hvd_abs.training.events import Callback

    defaults = TrainConfig()
    cfg = defaults if cfg is None else cfg
    # callbacks= may hold Callback objects (a tracker of the script's own) beside MODULE:NAME strings.
    given_callbacks = options.get("callbacks", ())
    objects = [c for c in given_callbacks if isinstance(c, Callback)]
    if objects:
        options["callbacks"] = tuple(c for c in given_callbacks if not isinstance(c, Callback))
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    unknown = sorted(set(options) - set(fields))
    if unknown:
        import difflib

        near = [m for u in unknown for m in difflib.get_close_matches(u, fields, n=1, cutoff=0.75)]
        hint = f" (did you mean {', '.join(near)}?)" if near else ""
        raise TypeError(f"fit() got unknown options {unknown}{hint}: see hvd_abs.TrainConfig for the fields")
    merged = {**dataclasses.asdict(cfg), **options}
    if merged["resume"] is not None:
        # fit(resume=DIR, epochs=...) continues the run as `hvd-abs train --resume DIR` does: in
        # DIR, with the run's own options where these do not give them. A config's field counts
        # as given when its command line gave it (parse_train_args), else when it is not the default.
        from_cli = getattr(cfg, "_given_options", None)
        given = lambda name: name in options or (name in from_cli if from_cli is not None  # noqa: E731
                                                 else merged[name] != getattr(defaults, name))
        cfg = TrainConfig(**resumed_options(merged, given))
    else:
        cfg = TrainConfig(**merged)
    if model is not None and cfg.model != defaults.model:
        raise UserError(f"--model {cfg.model} names a built-in model, but fit got model=: drop one of them")
    if data is not None and (cfg.dataset != defaults.dataset or cfg.download):
        raise UserError(f"--dataset {cfg.dataset}{' --download' if cfg.download else ''} picks a built-in data set, "
                        f"but fit got data=: drop one of them")
    if data is not None:
        _check_data(data, cfg, own_model=model is not None)
    if model is not None and not (isinstance(model, nn.Module) or callable(model)):
        raise UserError(f"model must be a torch.nn.Module or a function returning one, got {type(model).__name__}")
    on_epoch = (lambda r: click.echo(epoch_line(r), err=True)) if echo and not cfg.quiet else None
    summary = train(cfg, on_epoch=on_epoch, model=model, data=data, callbacks=objects)
    # Rank 0's final summary; in a relayed job the launcher prints it, from its OUT.
    if echo and summary is not None and "plot" in summary and not launcher_prints_summary(cfg.elastic):
        click.echo(format_summary(summary))
    return summary


def _check_data(data: Any, cfg: TrainConfig, own_model: bool) -> None:
    if not isinstance(data, Splits):
        raise UserError(f"data must be a hvd_abs Splits, got {type(data).__name__}: make it with "
                        f"hvd_abs.splits_from_tensors or hvd_abs.splits_from_datasets")
    if not own_model and len(data.in_shape) != 3:
        raise UserError(f"the built-in models take images (C, H, W), but these samples have shape {data.in_shape}: "
                        f"pass your own model (fit(model=...))")
    floats = all(getattr(x, "dtype", torch.uint8).is_floating_point for x in (data.train_x, data.test_x))
    if cfg.method == "absa" and cfg.adv_ratio > 0 and floats:  # (uint8 and image files are [0, 1] by scaling)
        # FGSM clamps its inputs to [0, 1] (adv_eps is on that scale): other ranges would be cut.
        # (Streamed: the range of the first 64 samples of each split.)
        xs = [take(x, torch.arange(min(64, len(x)))) if isinstance(x, Streamed) else x
              for x in (data.train_x, data.test_x)]
        low = min(float(xs[0].min()), float(xs[1].min()))
        high = max(float(xs[0].max()), float(xs[1].max()))
        if low < 0 or high > 1 or not (math.isfinite(low) and math.isfinite(high)):
            raise UserError(f"absa needs inputs in [0, 1] (FGSM's --adv-eps is on that scale), but they run from "
                            f"{low:.4g} to {high:.4g}: scale them to [0, 1] and normalise inside the model "
                            f"(hvd_abs.models.Normalize), or use --method abs")


def load_model(run_dir: str | Path, model: nn.Module | Callable[[], nn.Module] | None = None) -> nn.Module:
    """The trained model of a run: its model.pt (the weights where the run ended) loaded into
    `model`, the module (or class or function making it) the run trained; without one, into the
    run's built-in --model, rebuilt from its summary.json. On the CPU, in eval() mode."""
    run = Path(run_dir).expanduser()
    if run.is_file() and run.name == WEIGHTS_FILE:  # the model.pt itself
        run = run.parent
    elif run.is_file():
        raise UserError(f"{run} is a file, not a run: pass the run's --out folder (or its {WEIGHTS_FILE})")
    weights = run / WEIGHTS_FILE
    if not weights.is_file():
        why = (f"the run has not finished: continue it with --resume {run}" if (run / CHECKPOINT_DIR).is_dir()
               else "no run ended there: pass the --out folder of a finished run")
        raise UserError(f"{weights} does not exist ({why})")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or foreign: pickle, zip and torch each raise their own
        raise UserError(f"{weights} is not a readable state dict ({type(exc).__name__}): train the run again, or "
                        f"load its newest checkpoint with --resume {run}") from None
    if not isinstance(state, dict):
        raise UserError(f"{weights} holds a {type(state).__name__}, not a state dict: train the run again, or "
                        f"load its newest checkpoint with --resume {run}")
    if model is None:
        model = _built_in_model_of(run)
    elif not isinstance(model, nn.Module) and not callable(model):
        raise UserError(f"model= must be a torch.nn.Module or a class or function making one, got "
                        f"{type(model).__name__} {model!r}: for a built-in model, leave model= out")
    elif not isinstance(model, nn.Module):
        from hvd_abs.training.user_model import check_no_arguments_needed

        check_no_arguments_needed(model)
        model = model()
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:200]
        raise UserError(f"{weights} does not fit {type(model).__name__} ({first}): pass the model the run "
                        f"trained") from None
    return model.eval()


def _built_in_model_of(run: Path) -> nn.Module:
    import json

    from hvd_abs.models import build_model

    try:
        summary = json.loads((run / SUMMARY_FILE).read_text())
        name, classes, shape = summary["model"], summary["num_classes"], tuple(summary["in_shape"])
        if not (isinstance(name, str) and isinstance(classes, int) and classes >= 1 and len(shape) == 3
                and all(isinstance(n, int) and n >= 1 for n in shape)):
            raise ValueError("malformed")
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{run / SUMMARY_FILE} does not say which model the run trained (missing, damaged, or "
                        f"from before hvd_abs kept it): pass load_model(..., model=) the model") from None
    if summary.get("own_model"):
        raise UserError(f"the run in {run} trained your own model ({name}): pass it as the run built it, "
                        f"load_model(..., model=...) with the module, or its class or a function making it")
    # The input statistics are buffers of the state dict: placeholders here, the run's once loaded.
    return build_model(name, classes, shape, mean=[0.0] * shape[0], std=[1.0] * shape[0])
