"""plots.png of an elastic run shows its world size and marks its resizes (hvd_abs/plotting.py)."""
from __future__ import annotations

import json
from pathlib import Path

from hvd_abs import plotting


def _run(tmp_path: Path, worlds: list[int], events: list[dict]) -> Path:
    lines = [{"epoch": i + 1, "updates": 10 * (i + 1), "global_batch": 32 * (1 + (i > 0)), "eig": 1.0, "lr": 0.1,
              "train_acc": 0.5, "test_acc": 0.4, "world_size": w} for i, w in enumerate(worlds)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*lines, *events]))
    return tmp_path


def _drawn(monkeypatch, run: Path):
    figs = []

    def keep(fig, path, **kwargs):
        figs.append(fig)
        return Path(path)

    monkeypatch.setattr(plotting, "savefig_atomic", keep)
    plotting.plot_run(run)
    return figs[0]


def test_an_elastic_run_shows_its_workers_and_marks_each_resize(tmp_path, monkeypatch) -> None:
    run = _run(tmp_path, [1, 2, 2], [{"event": "growth", "epoch": 1, "updates": 10},
                                     {"event": "resize", "epoch": 2, "updates": 15, "world_size": 2}])
    fig = _drawn(monkeypatch, run)
    main, twin = fig.axes[:4], fig.axes[4:]
    assert len(twin) == 1 and twin[0].get_ylabel().startswith("workers")
    for ax in main:
        dashed = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
        assert [ln.get_xdata()[0] for ln in dashed] == [15]
    assert "dashed = elastic resize" in fig._suptitle.get_text()


def test_a_fixed_world_run_has_neither(tmp_path, monkeypatch) -> None:
    fig = _drawn(monkeypatch, _run(tmp_path, [1, 1, 1], [{"event": "growth", "epoch": 1, "updates": 10}]))
    assert len(fig.axes) == 4 and "dashed" not in fig._suptitle.get_text()
    assert not any(ln.get_linestyle() == "--" for ax in fig.axes for ln in ax.get_lines())
