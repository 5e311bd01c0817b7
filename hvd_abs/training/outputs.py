"""Where a run's durable files go: OUT on this host (LocalOutputs), or, for a job whose workers
may run on other hosts, the launcher's OUT through the job channel (elastic/outputs_relay.py,
the same calls). The launcher's job service carries out relayed calls with a LocalOutputs, so a
relayed run and a local one write the same files by the same rules.

    prepare(overwrite, resumed_at, config)  once per job: clear a replaced run, drop lines after a
                                     resume, write OUT/config.yaml
    writer(rank, in_place)           rank 0's metrics writer (a no-op writer elsewhere)
    save_checkpoint(state, updates, keep)  OUT/checkpoints/ckpt-<updates>.pt, the newest `keep` kept
    finish(weights, summary, plot)   model.pt, plots.png, summary.json; the replaced run removed
"""
from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch

from hvd_abs.atomic import write_atomic, write_text_atomic
from hvd_abs.metrics import METRICS_FILE, MetricsWriter, cut_back, read_metrics
from hvd_abs.training.config_file import CONFIG_FILE
from hvd_abs.training.checkpoint import save_checkpoint, save_payload, to_host
from hvd_abs.training.run_dir import CHECKPOINT_DIR, REPLACED_DIR, WEIGHTS_FILE, open_writer, prepare_out_dir


def weights_bytes(model: torch.nn.Module) -> bytes:
    """The model's state_dict on the host as a plain torch file's bytes: model.pt opens without
    hvd_abs (torch.load(path, weights_only=True)), as the checkpoints do."""
    buf = io.BytesIO()
    torch.save(to_host(model.state_dict()), buf)
    return buf.getvalue()


class LocalOutputs:
    """The run's files in `out` on this host."""

    def __init__(self, out: str | Path, loggers: Sequence[str] = ()) -> None:
        self.out = Path(out).expanduser()
        self.loggers = tuple(loggers)  # --logger: copies of metrics.jsonl the writer keeps

    def prepare(self, overwrite: bool, resumed_at: tuple[int, int] | None, config: str | None = None) -> None:
        """The folder made (a replaced run moved aside), lines after a resume's checkpoint cut,
        and `config` (the run's resolved options, YAML) written as OUT/config.yaml."""
        prepare_out_dir(self.out, overwrite)
        if resumed_at is not None:  # lines of an attempt after the checkpoint: redone now
            cut_back(self.out, *resumed_at)
        if config is not None:
            write_text_atomic(self.out / CONFIG_FILE, config)

    def writer(self, rank: int, in_place: bool) -> MetricsWriter:
        return open_writer(self.out, in_place, rank, self.loggers)

    def save_checkpoint(self, state: dict[str, Any], updates: int, keep: int) -> str:
        return str(save_checkpoint(self.out / CHECKPOINT_DIR, state, updates, keep))

    def save_checkpoint_payload(self, payload: bytes, updates: int, keep: int) -> str:
        """A checkpoint already serialized (a relayed one: written as it came)."""
        return str(save_payload(self.out / CHECKPOINT_DIR, payload, updates, keep))

    def save_weights(self, weights: bytes) -> str:
        return str(write_atomic(self.out / WEIGHTS_FILE, lambda fh: fh.write(weights)))

    def finish(self, weights: bytes, summary: dict[str, Any], plot: bool, writer: MetricsWriter) -> dict[str, Any]:
        """model.pt, plots.png (when asked and an epoch ended) and the final summary.json."""
        return self.complete({**summary, "weights": self.save_weights(weights)}, plot, writer)

    def complete(self, summary: dict[str, Any], plot: bool, writer: MetricsWriter) -> dict[str, Any]:
        """The summary completed from the run's files (its resets, the plot), written; the run
        an --overwrite replaced removed, now that the new one is whole."""
        summary = {**summary, "resets": elastic_resets(self.out)}
        if plot:
            if summary.get("epochs"):  # a run stopped before its first epoch end has nothing to draw
                from hvd_abs.plotting import plot_run

                summary["plot"] = str(plot_run(self.out))
            summary["metrics"] = str(self.out / METRICS_FILE)
        writer.summary(**summary)
        shutil.rmtree(self.out / REPLACED_DIR, ignore_errors=True)
        return summary


def elastic_resets(out: Path) -> list[dict[str, Any]]:
    """The run's elastic resets (a join or leave: "resize"; a lost worker: "failure") from its
    metrics.jsonl, each with its epoch, update, new world size and stall; [] for a fixed world."""
    if not (out / METRICS_FILE).exists():
        return []
    _, events = read_metrics(out)
    return [{k: e.get(k) for k in ("event", "epoch", "updates", "world_size", "stall_s")}
            for e in events if e["event"] in ("resize", "failure")]
