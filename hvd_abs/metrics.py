"""metrics.jsonl and summary.json, written by rank 0 only.

metrics.jsonl has one JSON object per line:
- an epoch line (no `event` field) with exactly EPOCH_FIELDS;
- an event line with `event` in EVENTS (growth, resize, failure, checkpoint), `epoch`, `updates`
  and event-specific fields.
Lines are flushed as written, so a crashed run keeps what it did. A run killed mid-write leaves
a partial last line: readers skip it with a warning, and a writer reopening the file (--resume)
cuts it off first, so that the next line does not join it. Any other unreadable line means the
file is damaged, and reading it raises UserError.
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

from hvd_abs.atomic import write_text_atomic
from hvd_abs.errors import UserError

log = logging.getLogger(__name__)

EPOCH_FIELDS = ("epoch", "updates", "samples_seen", "global_batch", "world_size", "per_worker_batch",
                "accum_steps", "lr", "eig", "eig_samples", "adv_ratio", "train_loss", "train_acc",
                "test_loss", "test_acc", "epoch_s", "samples_per_s", "second_order_s")
EVENTS = ("growth", "resize", "failure", "checkpoint")
_ONCE_EVENTS = ("growth", "checkpoint")  # tied to an update count: redone work must not repeat them
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


def _clean(value: Any) -> Any:
    # JSON has no NaN/inf: write null instead of invalid JSON.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsWriter:
    """Appends to `<out>/metrics.jsonl`; a no-op writer on ranks other than 0 (`enabled=False`)."""

    def __init__(self, out_dir: str | os.PathLike, enabled: bool = True, loggers: Sequence[str] = ()) -> None:
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self.epochs: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self._fh = None
        self._closed = False
        # A rolled-back elastic job, or a resumed one, redoes epochs whose lines are already in
        # the file: such a line (and its growth/checkpoint events) is written once, not again.
        self._last_epoch = 0
        self._seen_events: set[tuple[str, Any]] = set()
        self.loggers: list[Any] = []
        self._logger_names, self._existing = tuple(loggers), []
        if enabled:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            path = self.out_dir / METRICS_FILE
            existing = list(_lines(path)) if path.exists() else []
            if path.exists():
                for line in existing:
                    if "event" not in line:
                        epoch = line.get("epoch") or 0
                        if not isinstance(epoch, int):
                            raise UserError(f"{path}: epoch {epoch!r} is not a whole number: the file is damaged; "
                                            f"fix or delete that line, or pass another --out")
                        self._last_epoch = max(self._last_epoch, epoch)
                    elif line["event"] in _ONCE_EVENTS:
                        self._seen_events.add((line["event"], line.get("updates")))
                _end_last_line(path)
            self._existing = existing if loggers else []  # (the loggers' start; else not kept)

    def _write(self, record: dict[str, Any]) -> None:
        if self.enabled and self._fh is None and not self._closed:
            # Opened at the first line, not before: a run that fails before it has anything to
            # record leaves no metrics.jsonl, which would mark its --out as holding a run.
            if self._logger_names:  # (first: a logger that cannot start leaves no metrics.jsonl behind)
                from hvd_abs.loggers import LOGGERS

                self.loggers = [LOGGERS[name](self.out_dir, self._existing) for name in self._logger_names]
            self._fh = open(self.out_dir / METRICS_FILE, "a", encoding="utf-8")
        if self._fh is not None:
            clean = {k: _clean(v) for k, v in record.items()}
            self._fh.write(json.dumps(clean) + "\n")
            self._fh.flush()
            for logger in self.loggers:
                logger.write(clean)

    def epoch(self, **fields: Any) -> dict[str, Any]:
        """Write one epoch line; `fields` must be exactly EPOCH_FIELDS."""
        missing = set(EPOCH_FIELDS) - set(fields)
        extra = set(fields) - set(EPOCH_FIELDS)
        if missing or extra:
            raise ValueError(f"epoch metrics fields: missing {sorted(missing)}, unexpected {sorted(extra)}")
        record = {k: fields[k] for k in EPOCH_FIELDS}
        self.epochs.append(record)
        if record["epoch"] > self._last_epoch:
            self._write(record)
            self._last_epoch = record["epoch"]
        return record

    def event(self, event: str, **fields: Any) -> dict[str, Any]:
        """Write one event line (`event` in EVENTS)."""
        if event not in EVENTS:
            raise ValueError(f"unknown event {event!r}; expected one of {EVENTS}")
        record = {"event": event, **fields}
        self.events.append(record)
        key = (event, fields.get("updates"))
        if event not in _ONCE_EVENTS or key not in self._seen_events:
            self._write(record)
            self._seen_events.add(key)
        return record

    def summary(self, **fields: Any) -> None:
        """Write `<out>/summary.json` atomically (temp file, then rename)."""
        if not self.enabled:
            return
        write_text_atomic(self.out_dir / SUMMARY_FILE, json.dumps({k: _clean(v) for k, v in fields.items()}, indent=2) + "\n")

    def close(self) -> None:
        """Close the file (idempotent); later lines are not written."""
        self._closed = True
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        for logger in self.loggers:
            logger.close()
        self.loggers = []


def cut_back(out_dir: str | os.PathLike, epoch: int, updates: int) -> int:
    """Before a run resumes in its folder from a checkpoint at `epoch` and `updates`: drop the
    lines of later work (epochs after `epoch`, events after `updates`). They come from an attempt
    that ended after that checkpoint; the resumed run redoes that work, maybe with other options
    (--epochs), so its own lines must replace them (as TensorBoard's purge_step does). A damaged
    file is refused before anything changes; the file is rewritten atomically. Returns the number
    of lines dropped."""
    path = Path(out_dir) / METRICS_FILE
    if not path.exists():
        return 0
    MetricsWriter(out_dir).close()  # the checks of the writer the run opens next
    records = list(_lines(path))

    def later(r: dict[str, Any]) -> bool:
        mark, limit = (r.get("updates"), updates) if "event" in r else (r.get("epoch"), epoch)
        return isinstance(mark, int) and mark > limit

    keep = [r for r in records if not later(r)]
    if len(keep) < len(records):
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in keep))
        log.warning("%s: %d lines after the checkpoint (epoch %d, update %d) dropped: the resumed run redoes "
                    "that work", path, len(records) - len(keep), epoch, updates)
    return len(records) - len(keep)


def read_metrics(path: str | os.PathLike) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(epoch lines, event lines) of a metrics.jsonl (or of the run dir holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    epochs, events = [], []
    for line in _lines(path):
        (events if "event" in line else epochs).append(line)
    return epochs, events


def _lines(path: Path) -> Iterator[dict[str, Any]]:
    # Bytes, not text: undecodable bytes are one more kind of bad line, not a UnicodeDecodeError.
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {path} ({exc.strerror}): fix its permissions or pass another run dir") from None
    numbered = [(n, raw.strip()) for n, raw in enumerate(data.splitlines(), 1)]
    numbered = [(n, raw) for n, raw in numbered if raw]
    for i, (n, raw) in enumerate(numbered):
        record = _record(raw)
        if record is not None:
            yield record
        elif i == len(numbered) - 1:
            # A run killed mid-write leaves a partial last line: skip it, say so.
            log.warning("%s:%d: unreadable line skipped", path, n)
        else:
            raise UserError(f"{path} line {n} is not a JSON object: the file is damaged; "
                            f"fix or delete that line, or pass another run dir")


def _record(raw: bytes) -> dict[str, Any] | None:
    """The JSON object on one line, or None if the line is not one (bad UTF-8, bad JSON, a list)."""
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def _end_last_line(path: Path) -> None:
    """Before appending: end a complete last line that lacks its newline, or cut off a partial one.

    Otherwise the next line would be glued to it, and the glued line, no longer last, would make
    the file unreadable.
    """
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    head, newline, tail = data.rpartition(b"\n")
    with open(path, "r+b") as fh:
        if tail.strip() and _record(tail.strip()) is None:
            log.warning("%s: partial last line cut off before appending", path)
            fh.truncate(len(head) + len(newline))
        else:
            fh.seek(0, os.SEEK_END)
            fh.write(b"\n")
