"""`hvd-abs hessian`: top-k Hessian eigenvalues (and optionally the trace) of a model on data."""
from __future__ import annotations

import json
from typing import Any

import click

from hvd_abs.errors import user_errors_exit_2


def _positive(example: str) -> Any:
    def check(ctx: click.Context, param: click.Parameter, value: int) -> int:
        if value <= 0:
            raise click.BadParameter(f"must be a positive integer (e.g. {example}), got {value}")
        return value
    return check


@click.command("hessian")
@click.option("--model", "model_name", default="resnet20", show_default=True,
              help="Model name for hvd_abs.models.build_model (resnet20, c1, cnn, mlp, tv:<name>).")
@click.option("--dataset", default="cifar10", show_default=True, help="Data set for hvd_abs.data.load_dataset.")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Where the data set lives (torchvision root or ImageFolder tree).")
@click.option("--samples", default=512, show_default=True, callback=_positive("--samples 512"),
              help="Training samples the Hessian is taken over (a seeded random subset).")
@click.option("--batch-size", default=128, show_default=True, callback=_positive("--batch-size 128"),
              help="Samples per forward pass (the Hessian is of the mean loss over all samples).")
@click.option("--top-k", "top_k", default=3, show_default=True, callback=_positive("--top-k 3"),
              help="How many of the largest eigenvalues.")
@click.option("--trace", "with_trace", is_flag=True, help="Also estimate the trace (Hutchinson).")
@click.option("--run", "run_dir", type=click.Path(file_okay=False), default=None,
              help="A finished `hvd-abs train` run: its model.pt, and its --model, --dataset and --data-dir "
                   "unless given here.")
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
              help="Model weights: an hvd-abs checkpoint, a run's model.pt or another torch state dict "
                   "(default: random init).")
@click.option("--method", type=click.Choice(["lanczos", "power"]), default="lanczos", show_default=True,
              help="Eigen solver: thick-restart Lanczos or power iteration with deflation.")
@click.option("--tol", default=1e-3, show_default=True, type=float, help="Relative tolerance.")
@click.option("--max-iter", default=100, show_default=True, callback=_positive("--max-iter 100"),
              help="Lanczos: most products in all; power: most iterations per eigenvalue; trace: most probes.")
@click.option("--seed", default=0, show_default=True, help="Seed of the sample subset, start vectors and probes.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where the model and the Hessian-vector products run.")
@click.option("--density", "density_plot", type=click.Path(dir_okay=False), default=None, metavar="PLOT.png",
              help="Also estimate the spectral density (stochastic Lanczos quadrature, as PyHessian) and draw "
                   "it into this file.")
@click.option("--density-steps", default=90, show_default=True, callback=_positive("--density-steps 90"),
              help="Lanczos steps per probe of the density.")
@click.option("--density-probes", default=1, show_default=True, callback=_positive("--density-probes 1"),
              help="Random start vectors the density is averaged over.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@user_errors_exit_2
def command(model_name: str, dataset: str, data_dir: str | None, samples: int, batch_size: int, top_k: int,
            with_trace: bool, run_dir: str | None, checkpoint: str | None, method: str, tol: float, max_iter: int,
            seed: int, device: str, density_plot: str | None, density_steps: int, density_probes: int,
            as_json: bool) -> None:
    """Top-k eigenvalues (and trace) of the training-loss Hessian, as ABS uses them.

    The model runs in eval() mode (BatchNorm running statistics), as in HessianFlow.
    """
    import time
    from pathlib import Path

    import torch
    from torch import nn

    from hvd_abs.data import load_dataset
    from hvd_abs.data.streaming import take
    from hvd_abs.errors import UserError
    from hvd_abs.models import build_model
    from hvd_abs.second_order import hessian_density, hessian_trace, top_eigenvalues
    from hvd_abs.second_order import vecops

    if not tol > 0:
        raise click.BadParameter(f"must be > 0 (e.g. --tol 1e-3), got {tol}", param_hint="--tol")
    if run_dir is not None:
        model_name, dataset, data_dir, checkpoint = _from_run(run_dir, model_name, dataset, data_dir, checkpoint)
    if device == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("no CUDA device is usable here; use --device cpu", param_hint="--device")
    if data_dir is not None:
        from pathlib import Path

        if not Path(data_dir).expanduser().is_dir():
            raise click.BadParameter(f"{data_dir} is not a directory; point --data-dir at the data set's folder",
                                     param_hint="--data-dir")
    t0 = time.perf_counter()
    try:
        splits = load_dataset(dataset, data_dir)
    except UserError as exc:
        raise click.UsageError(str(exc)) from None
    except (FileNotFoundError, RuntimeError) as exc:
        raise click.UsageError(f"could not load {dataset!r} from {data_dir or 'the default cache'} ({exc}); "
                               "pass --data-dir DIR with the data set") from None
    state = _load_weights(checkpoint) if checkpoint else None
    normalise = state is not None and any(k.startswith("normalize.") for k in state)
    try:
        model = build_model(model_name, splits.num_classes, tuple(splits.in_shape),
                            *((splits.mean, splits.std) if normalise else (None, None)))
    except UserError as exc:
        raise click.UsageError(str(exc)) from None
    if state is not None:
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise click.UsageError(f"--checkpoint {checkpoint} does not fit --model {model_name} "
                                   f"({str(exc).splitlines()[0]}); pass the model it was trained with") from None
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if top_k > n_params:  # checked here, before the data are moved and the solver starts
        raise click.BadParameter(f"--model {model_name} has only {n_params} trainable parameters; pass --top-k "
                                 f"{n_params} or fewer", param_hint="--top-k")
    n = len(splits.train_y)
    if samples > n:
        raise click.BadParameter(f"the training split has only {n} samples; pass --samples {n} or fewer",
                                 param_hint="--samples")
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:samples]
    x, y = take(splits.train_x, idx), splits.train_y[idx]
    batches = [(x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)) for i in range(0, samples, batch_size)]
    crit = nn.CrossEntropyLoss()
    load_s = time.perf_counter() - t0

    if density_plot is not None:
        from hvd_abs.atomic import unwritable_reason

        import matplotlib.figure

        why = unwritable_reason(density_plot)  # (before the work, not after it)
        if why:
            raise click.BadParameter(f"{density_plot} {why}", param_hint="--density")
        kinds = matplotlib.figure.Figure().canvas.get_supported_filetypes()
        suffix = Path(density_plot).suffix.lstrip(".").lower()
        if suffix not in kinds:
            raise click.BadParameter(f"{density_plot}: give an image file name ending in one of "
                                     f"{', '.join('.' + k for k in sorted(kinds))}", param_hint="--density")
    eig = top_eigenvalues(model, crit, batches, k=top_k, tol=tol, max_iter=max_iter, method=method, seed=seed)
    trace = hessian_trace(model, crit, batches, tol=tol, max_iter=max_iter, seed=seed) if with_trace else None
    density = None
    if density_plot is not None:
        density = hessian_density(model, crit, batches, steps=density_steps, probes=density_probes, seed=seed)
        _plot_density(density, density_plot, f"{model_name} on {samples} samples of {dataset}")
    report: dict[str, Any] = {
        "model": model_name, "dataset": dataset, "samples": samples, "device": device,
        "checkpoint": checkpoint, "method": method, "tol": tol, "top_k": top_k,
        "eigenvalues": eig.eigenvalues, "converged": eig.converged, "eigen_hvps": eig.num_hvps,
        "eigen_seconds": round(eig.seconds, 3),
        "trace": trace.as_dict() if trace else None,
        "density": {**density.as_dict(), "plot": density_plot} if density else None,
        "hvps": eig.num_hvps + sum(r.num_hvps for r in (trace, density) if r),
        "seconds": round(eig.seconds + sum(r.seconds for r in (trace, density) if r), 3),
        "load_seconds": round(load_s, 3), "vecops": vecops.get(device=device).name,
    }
    if as_json:
        click.echo(json.dumps(report))
        return
    vals = ", ".join(f"{v:.6g}{'' if c else ' (not converged)'}" for v, c in zip(eig.eigenvalues, eig.converged))
    click.echo(f"top-{top_k} eigenvalues ({method}): {vals}")
    click.echo(f"  {eig.num_hvps} Hessian-vector products, {eig.seconds:.2f} s")
    if trace:
        unsettled = "" if trace.converged else (f" (not converged: stderr above --tol {tol:g} of the value after "
                                                  f"--max-iter {max_iter} probes; raise either)")
        click.echo(f"trace: {trace.value:.6g} +- {trace.stderr:.3g} (stderr){unsettled}, {trace.num_hvps} products, "
                   f"{trace.seconds:.2f} s")
    if density:
        nodes = [x for p in density.nodes for x in p]
        click.echo(f"spectral density: {len(nodes)} nodes from {min(nodes):.4g} to {max(nodes):.4g}, "
                   f"{density.num_hvps} products, {density.seconds:.2f} s; plot: {density_plot}")
    click.echo(f"{samples} samples of {dataset}, model {model_name} on {device}; vector ops: {report['vecops']}")


def _plot_density(density: Any, path: str, title: str) -> None:
    """The smoothed density on a log scale, as PyHessian draws it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hvd_abs.atomic import savefig_atomic

    from pathlib import Path

    Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
    grid, values = density.curve()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.semilogy(grid, [max(v, 1e-12) for v in values])
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (smoothed)")
    ax.set_title(f"Hessian spectral density: {title}", fontsize=9)
    fig.tight_layout()
    savefig_atomic(fig, path, dpi=100)
    plt.close(fig)


def _from_run(run_dir: str, model_name: str, dataset: str, data_dir: str | None,
              checkpoint: str | None) -> tuple[str, str, str | None, str]:
    """--run DIR: the run's model.pt and its model and data set, where not given on the command line."""
    from pathlib import Path

    from hvd_abs.metrics import SUMMARY_FILE
    from hvd_abs.training.run_dir import WEIGHTS_FILE

    run = Path(run_dir).expanduser()
    if checkpoint is not None:
        raise click.UsageError("--run DIR takes the run's model.pt: drop --checkpoint, or --run")
    try:
        summary = json.loads((run / SUMMARY_FILE).read_text())
        config = summary["config"]
        if not (isinstance(config, dict) and isinstance(summary.get("model"), str)
                and isinstance(config.get("dataset"), str) and isinstance(config.get("data_dir"), (str, type(None)))):
            raise ValueError("malformed")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise click.BadParameter(f"{run} holds no readable {SUMMARY_FILE}: pass the --out folder of a finished run",
                                 param_hint="--run") from None
    if not (run / WEIGHTS_FILE).is_file():
        raise click.BadParameter(f"{run} has no {WEIGHTS_FILE} (the run has not finished): finish it with "
                                 f"`hvd-abs train --resume {run}`, or pass --checkpoint with one of its checkpoints",
                                 param_hint="--run")
    if summary.get("own_model"):
        raise click.UsageError(f"the run in {run} trained its own model ({summary.get('model')}): this command builds "
                               f"built-in models; use hvd_abs.second_order.top_eigenvalues on "
                               f"hvd_abs.load_model({str(run)!r}, model=...) in Python")
    ctx = click.get_current_context()
    given = lambda name: ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE  # noqa: E731
    if not given("model_name"):
        model_name = summary["model"]
    if not given("dataset"):
        dataset = config["dataset"]
        if not given("data_dir"):
            data_dir = config.get("data_dir")
    return model_name, dataset, data_dir, str(run / WEIGHTS_FILE)


def _load_weights(path: str) -> dict[str, Any]:
    """A model state dict from an hvd-abs checkpoint (its "model" entry) or a plain state dict."""
    from pathlib import Path

    import torch

    from hvd_abs.training.checkpoint import CheckpointError, is_checkpoint, load_checkpoint

    p = Path(path).expanduser()
    if not p.is_file():
        raise click.BadParameter(f"{path} does not exist; pass a checkpoint file written by hvd-abs train",
                                 param_hint="--checkpoint")
    try:
        if is_checkpoint(p):
            state = load_checkpoint(p)
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except CheckpointError as exc:  # ours, and short: says what is wrong with the file
        raise click.BadParameter(f"{exc}; pass an intact hvd-abs checkpoint", param_hint="--checkpoint") from None
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a usage error here
        # Not torch's message: it is many lines of weights_only advice that does not apply here.
        raise click.BadParameter(f"{path} is not an hvd-abs checkpoint nor a torch state dict "
                                 f"({type(exc).__name__}); pass a checkpoint written by hvd-abs train",
                                 param_hint="--checkpoint") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise click.BadParameter(f"{path} holds no model state dict", param_hint="--checkpoint")
    return state
