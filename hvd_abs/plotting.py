"""plots.png: global batch, top eigenvalue, LR and accuracy against parameter updates."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from hvd_abs.metrics import read_metrics

log = logging.getLogger(__name__)

PLOT_FILE = "plots.png"


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Draw `<run_dir>/plots.png` (or `out`) from `<run_dir>/metrics.jsonl`; returns the path."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; chosen here, not at import time
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    epochs, events = read_metrics(run_dir)
    out_path = Path(out) if out is not None else run_dir / PLOT_FILE
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
    for ev in events:
        if ev.get("event") == "growth" and "updates" in ev:
            for a in axes.flat:
                a.axvline(ev["updates"], color="grey", lw=0.6, ls=":")
    for a in axes[1]:
        a.set_xlabel("parameter updates")
    fig.suptitle(f"{run_dir.name}: {len(epochs)} epochs, dotted lines = batch growth")
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
