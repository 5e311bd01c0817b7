"""`hvd-abs train`: SGD / ABS / ABSA training on one process or under horovodrun."""
from __future__ import annotations

import click

from hvd_abs.commands._errors import user_errors_exit_2


def _int_list(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
    if value is None:
        return None
    if value.strip() == "":
        raise click.BadParameter("is empty: leave it out for the default (E/3 and 2E/3), or give epochs, e.g. 30,60")
    try:
        epochs = [int(v) for v in value.replace(" ", "").split(",") if v]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of epochs, e.g. 30,60") from None
    if len(set(epochs)) < len(epochs):  # (here, not in validate: a resumed run's own list is not refused)
        raise click.BadParameter(f"{value} names an epoch twice (two decays at once): give each epoch once")
    return epochs


@click.command("train")
@click.option("--method", type=click.Choice(["sgd", "abs", "absa"]), default="absa", show_default=True,
              help="sgd: fixed batch; abs: adaptive batch; absa: adaptive batch + FGSM adversarial samples.")
@click.option("--dataset", default="digits", show_default=True,
              help="digits (offline), cifar10, cifar100, svhn, imagefolder.")
@click.option("--data-dir", default=None, help="Data folder (required for imagefolder).")
@click.option("--download", is_flag=True, help="Download a missing torchvision data set.")
@click.option("--model", default="auto", show_default=True,
              help="mlp, cnn, c1, resnet20, tv:<torchvision name>; auto: cnn for digits, resnet20 for CIFAR/SVHN.")
@click.option("--epochs", type=int, default=90, show_default=True)
@click.option("--base-batch", type=int, default=128, show_default=True,
              help="Micro-batch per worker and accumulation step (what BatchNorm sees).")
@click.option("--batch", type=int, default=None,
              help="Initial global batch (sgd: the fixed one, reached by accumulation). Default: --base-batch.")
@click.option("--max-batch", type=int, default=16384, show_default=True, help="Cap of the global batch.")
@click.option("--duration", type=int, default=10, show_default=True,
              help="Grow anyway after this many eigenvalue checks without growth (the first check only sets "
                   "the reference: with 1, the first growth comes after epoch 2).")
@click.option("--lr", type=float, default=0.1, show_default=True, help="LR at the initial batch.")
@click.option("--lr-decay", type=float, default=0.2, show_default=True, help="Step-decay factor.")
@click.option("--lr-decay-epochs", callback=_int_list, default=None,
              help="Comma-separated epochs of step decay (default: E/3 and 2E/3, i.e. 30,60 for 90 epochs).")
@click.option("--lr-schedule", type=click.Choice(["step", "cosine"]), default="step", show_default=True,
              help="step: x --lr-decay at --lr-decay-epochs (the paper's); cosine: (1 + cos(pi t / E)) / 2 over "
                   "the run, updated every step. Both multiply the growth scaling and warm-up.")
@click.option("--lr-scaling", type=click.Choice(["linear", "sqrt", "none"]), default="linear", show_default=True,
              help="LR change per doubling of the batch: x2, x sqrt(2), or none.")
@click.option("--warmup-epochs", type=float, default=0.0, show_default=True,
              help="Linear LR ramp over this many epochs at the start and after each growth (0: off).")
@click.option("--lr-cap", type=float, default=None, help="Upper bound of the LR (default: none).")
@click.option("--momentum", type=float, default=0.9, show_default=True)
@click.option("--nesterov", is_flag=True, help="Nesterov momentum.")
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--label-smoothing", type=float, default=0.0, show_default=True,
              help="Of the training loss (and of the Hessian the growth check estimates); the test loss is plain.")
@click.option("--clip-grad-norm", type=float, default=None,
              help="Clip the global batch's gradient to this L2 norm before each update (default: no clipping).")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="bf16: training and test forward passes under torch.autocast to bfloat16 (weights, gradients, "
                   "optimizer and the growth check's Hessian stay float32).")
@click.option("--augment", type=click.Choice(["none", "flip", "crop", "crop-flip"]), default="none",
              show_default=True,
              help="Training images randomly cropped (zero padding of 1/8 the side: 4 px at 32) and/or mirrored "
                   "left-right, per sample from (seed, epoch, index): the same on any number of workers. "
                   "crop-flip is the usual Cifar recipe; none is the paper's.")
@click.option("--adv-eps", type=float, default=0.005, show_default=True, help="FGSM step on the [0,1] pixel scale.")
@click.option("--adv-ratio", type=float, default=0.2, show_default=True,
              help="Share of each micro-batch replaced by FGSM inputs (absa), halved at each growth.")
@click.option("--eig-samples", type=int, default=None,
              help="Training samples for the epoch-end top-eigenvalue estimate, in --base-batch batches "
                   "(default: 1024).")
@click.option("--eig-method", type=click.Choice(["stochastic", "lanczos", "power"]), default=None,
              help="stochastic: streaming power iteration, one product per batch (default); lanczos/power: "
                   "top_eigenvalues on all samples at once (power on 128 samples = the reference).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "out", default="runs/latest", show_default=True, help="Run directory.")
@click.option("--overwrite", is_flag=True,
              help="Replace the run already in --out (kept in OUT/.replaced-run until the new run finishes).")
@click.option("--quiet", is_flag=True, help="No progress bar and no per-epoch lines.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--threads", type=int, default=None,
              help="torch threads per worker (default: torch's choice for 1 worker, cores / workers else).")
@click.option("--checkpoint-every", type=int, default=0, show_default=True,
              help="Epochs between disk checkpoints in OUT/checkpoints (0: only at the end).")
@click.option("--resume", default=None, metavar="DIR",
              help="Continue the run in DIR from its newest good checkpoint (OUT defaults to DIR).")
@click.option("--elastic", is_flag=True,
              help="Run as a worker of an elastic job (horovodrun --min-np/--max-np or `launch ray`): "
                   "commits, resizes and failures handled; use `hvd-abs launch` to start one.")
@click.option("--max-np", type=int, default=1, show_default=True,
              help="Elastic: most workers; the job asks for min(max-np, global batch / base batch).")
@click.option("--commit-every", type=int, default=10, show_default=True,
              help="Elastic: updates between in-memory state commits (also at every growth and epoch end).")
@click.option("--train-subset", type=int, default=None,
              help="Train on a fixed random subset of this many training samples (quick experiments).")
@click.option("--test-subset", type=int, default=None, help="Evaluate on a fixed random subset of the test split.")
@click.option("--stop-at-update", type=int, default=None, hidden=True,
              help="Checkpoint and stop after this many updates (restart benchmarks).")
@click.option("--ledger", is_flag=True, hidden=True, help="Test instrumentation: log each update's sample ids.")
@user_errors_exit_2
def command(**options) -> None:
    """Train with a fixed (sgd) or adaptive (abs, absa) batch; writes metrics.jsonl, summary.json, plots.png.

    Runs as one process, or as every worker of `horovodrun -np N ... hvd-abs train ...`.
    """
    import logging

    from hvd_abs.train import train

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = config_from_options(options, click.get_current_context())
    quiet = cfg.quiet

    def on_epoch(r: dict) -> None:
        if not quiet:
            click.echo(epoch_line(r), err=True)

    summary = train(cfg, on_epoch=on_epoch)
    if summary is None or "plot" not in summary:  # ranks other than 0 print nothing
        return
    click.echo(format_summary(summary))


def config_from_options(options: dict, ctx: click.Context):
    """The TrainConfig of parsed `hvd-abs train` options (defaults filled in; with --resume, the
    run's own options where not given again: hvd_abs.train.resumed_options)."""
    from hvd_abs.train import DEFAULT_EIG_METHOD, DEFAULT_EIG_SAMPLES, TrainConfig, resumed_options

    options = dict(options)
    if options["eig_samples"] is None:
        options["eig_samples"] = DEFAULT_EIG_SAMPLES
    if options["eig_method"] is None:
        options["eig_method"] = DEFAULT_EIG_METHOD
    given = lambda name: ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)  # noqa: E731
    return TrainConfig(**resumed_options(options, given))


def train_context(train_args: list[str], extras: bool = False, resilient: bool = False) -> click.Context:
    """`hvd-abs train`'s parsed command line. extras: a script's own arguments may be among the
    options (parse_train_args hands them to the script); they are kept in ctx.args."""
    return command.make_context("hvd-abs train", list(train_args), resilient_parsing=resilient,
                                ignore_unknown_options=extras, allow_extra_args=extras)


def check_script_extras(extras: list[str]) -> None:
    """Refuse a script's own argument that is a near miss of a train option (`--epoch` for
    --epochs): it would reach the script's parser instead, where argparse may even take it as an
    abbreviation of one of the script's options, and the train option keep its default.
    Raises click.UsageError naming the option meant."""
    import difflib

    names = [o for p in command.params for o in p.opts if o.startswith("--")]
    for arg in extras:
        name = arg.split("=", 1)[0]
        if not name.startswith("--") or name == "--":
            continue
        near = difflib.get_close_matches(name, names, n=1, cutoff=0.85)
        if near:
            raise click.UsageError(f"{name} is not an option of hvd-abs train: did you mean {near[0]}? (a script's "
                                   f"own options must not be near misses of them: rename it)")


def check_train_args(train_args: list[str], load_data: bool = False, script: bool = False) -> None:
    """Validate `hvd-abs train TRAIN_ARGS` as a launcher would start them, before anything starts:
    click's parsing, TrainConfig.validate() for a fresh (not elastic) run, so an out dir holding
    another run is refused unless --resume or --overwrite is given, and the data set's name.
    load_data: also load the data set (for workers on this machine: a wrong --data-dir is then one
    line here, not a traceback per worker; the decode cache it leaves saves the workers the work).
    script: the options of a `--script` (hvd_abs.parse_train_args): its own arguments may be
    among them, and the data set is the script's, so neither it nor its name is checked.
    Raises click.UsageError or UserError naming the fix."""
    import dataclasses

    from hvd_abs.data import DATASETS
    from hvd_abs.errors import UserError

    ctx = train_context(train_args, extras=script)
    if not script:  # (a script's workers check, knowing its own options: hvd_abs.parse_train_args)
        check_script_extras(ctx.args)
    cfg = config_from_options(ctx.params, ctx)
    dataclasses.replace(cfg, elastic=False).validate()
    if script:
        load_data = False
    elif cfg.dataset.strip().lower() not in DATASETS:
        raise UserError(f"--dataset {cfg.dataset!r} is unknown; pass one of {', '.join(DATASETS)}")
    if load_data:
        from hvd_abs.data import load_dataset

        load_dataset(cfg.dataset, data_dir=cfg.data_dir, download=cfg.download)
    if cfg.resume is not None:
        from pathlib import Path

        from hvd_abs.elastic.checkpoint import list_checkpoints, load_checkpoint, CheckpointError
        from hvd_abs.train import CHECKPOINT_DIR

        found = list_checkpoints(Path(cfg.resume).expanduser() / CHECKPOINT_DIR)
        for path in reversed(found):
            try:
                load_checkpoint(path)
                break
            except CheckpointError:
                continue
        else:
            raise UserError(f"--resume {cfg.resume}: no checkpoint there verifies "
                            f"({len(found)} found, all damaged or none); start a new run with another --out")


_COLUMNS = ("epoch", "updates", "global_batch", "world_size", "accum_steps", "lr", "eig", "adv_ratio",
            "train_acc", "test_acc", "epoch_s", "second_order_s")


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _acc(v) -> str:
    return "-" if v is None else f"{v:.4f}"  # 1.0000, not "1"


def epoch_line(r: dict) -> str:
    """An epoch's metrics as the one line `hvd-abs train` (and hvd_abs.fit) prints per epoch."""
    return "  ".join(f"{c}={_fmt(r.get(c))}" for c in _COLUMNS)


def _world_timeline(epochs: list[dict]) -> str:
    """'1 (epochs 1-2) -> 2 (epochs 3-10)': the world size at each epoch end, run-length coded."""
    spans: list[list[int]] = []  # [size, first epoch, last epoch]
    for e in epochs:
        if spans and spans[-1][0] == e["world_size"]:
            spans[-1][2] = e["epoch"]
        else:
            spans.append([e["world_size"], e["epoch"], e["epoch"]])
    return " -> ".join(f"{n} (epoch{'s' if a != b else ''} {a}{f'-{b}' if a != b else ''})" for n, a, b in spans) or "-"


def _resets(events: list[dict]) -> list[str]:
    """One line per elastic reset (resize or failure) with its stall."""
    return [f"{e['event']} to {e.get('world_size')} workers during epoch {e.get('epoch')} (update "
            f"{e.get('updates')}): stall {_fmt(e.get('stall_s'))}s" for e in events if e["event"] in ("resize", "failure")]


def format_summary(summary: dict) -> str:
    """The end-of-run table: one row per epoch, then the totals and the plot's path."""
    from hvd_abs.metrics import read_metrics

    epochs, events = read_metrics(summary["metrics"])
    head = ["epoch", "updates", "batch", "world", "accum", "lr", "eig", "adv", "train_acc", "test_acc", "s"]
    rows = [[_fmt(e[c]) for c in _COLUMNS[:-1]] for e in epochs]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    growth = ", ".join(f"{g['old_batch']}->{g['new_batch']} after epoch {g['epoch']} ({g['reason']})"
                       for g in summary["growths"]) or "none"
    lines += ["",
              f"method {summary['method']} on {summary['dataset']} ({summary['model']}): {summary['updates']} updates, "
              f"final test acc {_acc(summary['final_test_acc'])}, best {_acc(summary['best_test_acc'])}",
              f"batch growth: {growth}",
              f"workers: {_world_timeline(epochs)}",
              *_resets(events),
              f"time {summary['total_s']:.1f}s, second-order {summary['second_order_s']:.1f}s",
              f"metrics: {summary['metrics']}",
              f"plot: {summary['plot']}",
              f"weights: {summary['weights']}"]
    return "\n".join(lines)
