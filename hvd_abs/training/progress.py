"""What a run prints: one line per epoch while it trains, and the table at its end."""
from __future__ import annotations

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
