"""A run's outcome in one flat-ish dict (summary.json, the return value of fit and train)."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from hvd_abs.training.trainer import Trainer


def run_summary(t: Trainer) -> dict[str, Any]:
    """The outcome of `t` so far."""
    last = t.history[-1] if t.history else {}
    ctl = t.controller
    return {
        "method": t.cfg.method, "dataset": t.dataset_name, "model": t.model_name,
        "own_model": t.own_model, "num_classes": int(t.data.num_classes),
        "in_shape": list(t.data.train_x.shape[1:]),
        "epochs": len(t.history), "updates": t.updates, "samples_seen": t.samples_seen,
        "initial_batch": ctl.initial_batch, "final_batch": ctl.global_batch,
        "max_batch": ctl.max_batch, "num_growths": ctl.num_growths,
        "growths": [{k: g[k] for k in ("epoch", "updates", "old_batch", "new_batch", "reason")}
                    for g in t.growths],
        "world_size": t.comm.size, "final_lr": last.get("lr"),
        "final_test_acc": last.get("test_acc"),
        "best_test_acc": max((h["test_acc"] for h in t.history), default=None),
        "final_train_acc": last.get("train_acc"), "total_s": t.elapsed_s,
        "second_order_s": t.second_order_total_s,
        "second_order_share": t.second_order_total_s / t.elapsed_s if t.elapsed_s else None,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(t.cfg).items()},
    }
