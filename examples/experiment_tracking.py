"""Send a run's metrics to an experiment tracker (MLflow, Weights & Biases, ...) from a callback.

hvd_abs writes metrics.jsonl itself (and --logger csv|tensorboard); a tracker is a few lines of
your own on the callback events, on rank 0 only. MLflow is used when it is installed, else the
lines are printed; for W&B, `wandb.init(...)` in __init__ and `wandb.log(metrics, step=step)`.

    hvd-abs train --dataset digits --callback examples.experiment_tracking:Tracker ...
    (from the repository root; or hvd_abs.fit(..., callbacks=[Tracker()]) in a script)
"""
from __future__ import annotations

from typing import Any, Callable

from hvd_abs import Callback


def _mlflow_or_print() -> Callable[[dict[str, float], int], None]:
    try:
        import mlflow
    except ImportError:
        return lambda metrics, step: print(f"step {step}: {metrics}")
    return lambda metrics, step: mlflow.log_metrics(metrics, step=step)


class Tracker(Callback):
    """Every epoch's numbers and every batch growth, at their update count."""

    def __init__(self, log: Callable[[dict[str, float], int], None] | None = None) -> None:
        self.log = log or _mlflow_or_print()

    def on_epoch_logged(self, trainer: Any, record: dict[str, Any]) -> None:
        if trainer.comm.rank == 0:
            numbers = {k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and k != "updates"}
            self.log(numbers, record["updates"])

    def on_growth(self, trainer: Any, growth: dict[str, Any]) -> None:
        if trainer.comm.rank == 0:
            self.log({"growth/new_batch": float(growth["new_batch"])}, growth["updates"])
