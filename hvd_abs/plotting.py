"""plots.png: global batch (and an elastic run's workers), top eigenvalue, LR and accuracy
against parameter updates, with batch growths and elastic resets marked."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from hvd_abs.atomic import savefig_atomic
from hvd_abs.errors import UserError
from hvd_abs.metrics import METRICS_FILE, read_metrics

log = logging.getLogger(__name__)

PLOT_FILE = "plots.png"
_SERIES = ("global_batch", "eig", "lr", "train_acc", "test_acc")  # y values; None is drawn as a gap


def check_out(out: str | os.PathLike) -> Path:
    """The image path `out` if a figure can be written there, else UserError naming --out's fix.

    Checked before anything is drawn: the suffix picks the format (matplotlib's list), and the
    path must not be a directory nor lie under a file. Missing parent folders are created later.
    """
    from matplotlib.backend_bases import FigureCanvasBase

    if str(out).strip() == "":
        raise UserError("--out is empty: pass an image path such as plots.png")
    path = Path(out)
    if path.is_dir():
        raise UserError(f"--out {out} is a directory: pass a file path such as {path / PLOT_FILE}")
    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    if path.suffix.lstrip(".").lower() not in formats:
        raise UserError(f"--out {out} does not end in an image format matplotlib writes: pass a path ending in "
                        f"{', '.join('.' + f for f in formats)}")
    parent = next(p for p in path.absolute().parents if p.exists())  # the root always exists
    if not parent.is_dir():
        raise UserError(f"--out {out}: {parent} is a file, not a directory: pass a path in a folder")
    return path


def _check_epochs(epochs: list[dict[str, Any]], events: list[dict[str, Any]], source: Path) -> None:
    """UserError naming the file unless every value the plot draws is a number (or None for a gap)."""
    if not epochs:
        raise UserError(f"no epochs in {source}: nothing to plot; pass the run dir of a run that finished an epoch")

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    for e in epochs:
        bad = ([] if number(e.get("updates")) else ["updates"]) + \
              [k for k in _SERIES if e.get(k) is not None and not number(e[k])]
        if bad:
            raise UserError(f"{source}: epoch {e.get('epoch', '?')} has no numeric {', '.join(bad)}: "
                            f"the file is damaged or not from hvd-abs train; pass another run dir")
    for ev in events:
        if ev.get("event") == "growth" and "updates" in ev and not number(ev["updates"]):
            raise UserError(f"{source}: a growth event has a non-numeric updates {ev['updates']!r}: "
                            f"the file is damaged; pass another run dir")


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Draw `<run_dir>/plots.png` (or `out`) from `<run_dir>/metrics.jsonl`; returns the path written.

    Bad input (see check_out, _check_epochs) raises UserError before anything is written; the
    image is written whole or not at all (temp file, then rename).
    """
    import matplotlib

    matplotlib.use("Agg")  # no display needed; chosen here, not at import time
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    out_path = check_out(out if out is not None else run_dir / PLOT_FILE)
    epochs, events = read_metrics(run_dir)
    _check_epochs(epochs, events, run_dir / METRICS_FILE)
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    x = [e["updates"] for e in epochs]

    def series(key: str) -> list[Any]:
        return [float("nan") if e.get(key) is None else e[key] for e in epochs]

    panels = [(axes[0][0], "global_batch", "global batch", True),
              (axes[0][1], "eig", "top Hessian eigenvalue", True),
              (axes[1][0], "lr", "learning rate", True)]
    for ax, key, title, log_y in panels:
        ax.plot(x, series(key), marker="o", ms=3)
        ax.set_title(title)
        if log_y and any(v == v and v > 0 for v in series(key)):
            if key == "global_batch":  # doublings: powers of two with plain labels
                from matplotlib.ticker import ScalarFormatter

                ax.set_yscale("log", base=2)
                ax.yaxis.set_major_formatter(ScalarFormatter())
            else:
                ax.set_yscale("log")
    ax = axes[1][1]
    ax.plot(x, series("train_acc"), marker="o", ms=3, label="train")
    ax.plot(x, series("test_acc"), marker="o", ms=3, label="test")
    ax.set_title("accuracy")
    ax.set_ylim(0, 1)
    ax.legend(loc="lower right")
    worlds = [e.get("world_size") for e in epochs]
    if len({w for w in worlds if isinstance(w, int)}) > 1:  # an elastic run that resized
        twin = axes[0][0].twinx()
        twin.step(x, [float("nan") if w is None else w for w in worlds], where="pre", color="tab:orange",
                  label="workers")
        twin.set_ylabel("workers (of each epoch's last update)", color="tab:orange")
        from matplotlib.ticker import MaxNLocator

        twin.yaxis.set_major_locator(MaxNLocator(integer=True))
    resets = [ev for ev in events if ev.get("event") in ("resize", "failure") and isinstance(ev.get("updates"), (int, float))]
    for ev in events:
        if ev.get("event") == "growth" and "updates" in ev:
            for a in axes.flat:
                a.axvline(ev["updates"], color="grey", lw=0.6, ls=":")
    for ev in resets:
        for a in axes.flat:
            a.axvline(ev["updates"], color="tab:red", lw=0.6, ls="--")
    for a in axes[1]:
        a.set_xlabel("parameter updates")
    fig.suptitle(f"{run_dir.name}: {len(epochs)} epochs, dotted lines = batch growth"
                 + (", dashed = elastic resize or failure" if resets else ""))
    fig.tight_layout()
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        return savefig_atomic(fig, out_path, dpi=100)
    except OSError as exc:
        raise UserError(f"cannot write {out_path} ({exc.strerror or exc}): pass a writable --out") from None
    except (RuntimeError, ValueError) as exc:  # a format this machine cannot write, e.g. .pgf without LaTeX
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"cannot write {out_path} ({msg}): pass a .png --out") from None
    finally:
        plt.close(fig)
