"""Copies of metrics.jsonl in the formats other tools read (`--logger csv|tensorboard`).

metrics.jsonl stays the source of truth: a logger sees each line as the writer writes it (never a
line the writer skips as already written), and on opening it rebuilds itself from the lines
already in the file: the CSV is written anew from them, and TensorBoard drops the steps past them
(a resume's redone work) or, for a folder new to it (a logger added on a resume), replays them.

    csv          OUT/metrics.csv: the epoch lines, one column per metrics.jsonl field
    tensorboard  OUT/tensorboard/: each epoch field as a scalar against updates, growths and
                 resizes as their own scalars (`tensorboard --logdir OUT`)
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Sequence

from hvd_abs.atomic import write_text_atomic

CSV_FILE = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"


class Logger:
    """Receives every line metrics.jsonl gets. `existing`: the lines the file already holds."""

    def __init__(self, out_dir: Path, existing: Sequence[dict[str, Any]]) -> None: ...

    def write(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class CsvLogger(Logger):
    """The columns are the epoch line's fields (the writer writes exactly those, in one order)."""

    def __init__(self, out_dir: Path, existing: Sequence[dict[str, Any]]) -> None:
        self.path = out_dir / CSV_FILE
        self._fh: Any = None
        epochs = [r for r in existing if "event" not in r]
        if epochs:
            self._open(list(epochs[0]), epochs)
        else:
            self.path.unlink(missing_ok=True)  # (a copy of lines the file no longer has)

    def _open(self, fields: list[str], rows: Sequence[dict[str, Any]]) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        write_text_atomic(self.path, buf.getvalue())
        self._fh = open(self.path, "a", encoding="utf-8", newline="")
        self._csv = csv.DictWriter(self._fh, fieldnames=fields, lineterminator="\n")

    def write(self, record: dict[str, Any]) -> None:
        if "event" in record:
            return
        if self._fh is None:
            self._open(list(record), [record])
        else:
            self._csv.writerow(record)
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class TensorBoardLogger(Logger):
    # (event fields drawn as scalars; the rest of an event line is text in metrics.jsonl)
    EVENT_SCALARS = {"growth": ("new_batch", "eig", "noise_scale"), "resize": ("world_size", "stall_s"),
                     "failure": ("world_size", "stall_s")}

    def __init__(self, out_dir: Path, existing: Sequence[dict[str, Any]]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        done = [r["updates"] for r in existing if _number(r.get("updates"))]
        fresh = not list((out_dir / TENSORBOARD_DIR).glob("events.*"))
        # Steps after what metrics.jsonl holds come from an attempt a resume redoes: purged.
        self.tb = SummaryWriter(str(out_dir / TENSORBOARD_DIR), purge_step=max(done) + 1 if done else None)
        if fresh:
            for record in existing:
                self.write(record)

    def write(self, record: dict[str, Any]) -> None:
        step = record.get("updates")
        if not _number(step):
            return
        if "event" not in record:
            for k, v in record.items():
                if k not in ("epoch", "updates") and _number(v):
                    self.tb.add_scalar(f"epoch/{k}", v, global_step=step)
        else:
            for k in self.EVENT_SCALARS.get(record["event"], ()):
                if _number(record.get(k)):
                    self.tb.add_scalar(f"{record['event']}/{k}", record[k], global_step=step)
        self.tb.flush()

    def close(self) -> None:
        self.tb.close()


LOGGERS: dict[str, type[Logger]] = {"csv": CsvLogger, "tensorboard": TensorBoardLogger}
NEEDS = {"tensorboard": "tensorboard"}  # the package a logger imports (an extra of hvd_abs)


def logger_available(name: str) -> bool:
    import importlib.util

    return name not in NEEDS or importlib.util.find_spec(NEEDS[name]) is not None
