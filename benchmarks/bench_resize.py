"""Resize stalls on horovodrun: 1 -> 2 and 2 -> 1 workers, in place vs a restart baseline.

ResNet-20 on CIFAR-10 images (a fixed subset, so a run takes minutes on 2 cores), sgd at a global
batch of 2 x --base-batch, on localhost over Gloo.

- in place: `hvd-abs launch horovod --min-np 1 --max-np 2 --hostfile H [--warm 1]`. The pool
  starts with 1 slot; after --k updates it grows to 2 slots (a worker joins in place); after --k
  more it shrinks to 1 (a worker leaves). Stalls are the job's own `resize` events: from the end of
  the last update before the reset to the end of the first after it, minus one update's time.
- restart: what users do without elastic training. Run at the old size with --stop-at-update
  (a checkpoint, then every worker exits), relaunch horovodrun at the new size with --resume.
  Stall: from the end of the last update before (the ledger's wall-clock time) to the end of the
  first update after, minus one update's time.

Prints one JSON object and writes benchmarks/results/resize.json (and resize.png): stall seconds per resize for
each way, their ratios (in place / restart; target <= 0.15), and the resize share of a full
Cifar-10 run (90 epochs of 50,000 samples at the measured update time; target <= 0.3%).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from _args import add_data_dir, check_out  # benchmarks/, beside this file
from hvd_abs.atomic import savefig_atomic, write_text_atomic
from hvd_abs.errors import UserError

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def ledger(*outs: Path) -> list[dict]:
    """The run's ledger records by time, from the run dir `outs` (one per host on separate disks)."""
    return sorted((json.loads(line) for out in outs for f in (out / "ledger").glob("rank-*.jsonl")
                   for line in f.read_text().splitlines()), key=lambda r: r["t"])


def world_sizes(*outs: Path) -> list[int]:
    return [r["world_size"] for r in ledger(*outs) if r["rank"] == 0]


def step_time(records: list[dict]) -> float | None:
    """Median time between consecutive updates of rank 0 (no reset in between); None without two."""
    r0 = [r for r in records if r["rank"] == 0]
    gaps = [b["t"] - a["t"] for a, b in zip(r0, r0[1:]) if b["update"] == a["update"] + 1 and b["attempt"] == a["attempt"]]
    return statistics.median(gaps) if gaps else None


def measured(what: str, section: dict) -> dict:
    """`section` if it holds every measurement, else a UserError (one line, exit 2, nothing written):
    a resize the job ended before must not reach the result as null, nor count as 0 in a share.
    Shared with bench_resize_ray."""
    missing = [key for key, value in section.items() if value is None]
    if missing:
        raise UserError(f"{what}: {', '.join(missing)} not measured (the job ended before that resize took "
                        f"effect, or ran no two updates in a row at a size); no result written: raise --epochs "
                        f"or --train-subset, or lower --k")
    return section


def train_args(args: argparse.Namespace, out: Path) -> list[str]:
    return ["--dataset", "cifar10", "--data-dir", args.data_dir, "--model", "resnet20", "--method", "sgd",
            "--base-batch", str(args.base_batch), "--batch", str(2 * args.base_batch), "--epochs", str(args.epochs),
            "--train-subset", str(args.train_subset), "--test-subset", "256", "--lr", "0.05", "--threads", "1",
            "--commit-every", "1", "--quiet", "--callback", "hvd_abs.testing.ledger:Ledger", "--out", str(out), "--overwrite"]


def drive_in_place(launcher: list[str], args: argparse.Namespace, out: Path, grow: Callable[[], object],
                   shrink: Callable[[], object], ledgers: list[Path] | None = None,
                   on_host: Callable[[list[str]], list[str]] = list) -> None:
    """Run the job under `launcher`; after --k updates on 1 worker call `grow` (1 -> 2), after --k
    more on 2 call `shrink` (2 -> 1); raise if the job fails. Shared with bench_resize_ray and
    bench_resize_multihost: `on_host` wraps the command to run it on a host, `ledgers` are where
    the run dir of each host is seen from here (default: `out`)."""
    proc = subprocess.Popen(on_host([*launcher, "--", *train_args(args, out)]), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline, phase = time.time() + args.timeout, 0
    while proc.poll() is None and time.time() < deadline and phase < 2:
        sizes = world_sizes(*(ledgers or [out]))
        if phase == 0 and sizes.count(1) >= args.k:
            grow()
            phase = 1
        elif phase == 1 and sizes.count(2) >= args.k:
            shrink()
            phase = 2
        time.sleep(0.2)
    try:
        output, _ = proc.communicate(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        proc.terminate()  # a job left running past --timeout would hold the cores of every later run
        try:
            output, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        raise RuntimeError(f"in-place run still running after --timeout {args.timeout:g}s, stopped:\n{output[-3000:]}")
    if proc.returncode != 0:
        raise RuntimeError(f"in-place run failed:\n{output[-3000:]}")


def update_times(out: Path) -> dict:
    """Median update time at 1 and at 2 workers, from the run's ledger."""
    records = ledger(out)
    return {f"update_s_{n}": step_time([r for r in records if r["world_size"] == n]) for n in (1, 2)}


def in_place(args: argparse.Namespace, work: Path, warm: bool) -> dict:
    out, hostfile = work / ("warm" if warm else "cold"), work / f"hosts-{warm}"
    hostfile.write_text("localhost slots=1\n")
    cmd = [str(BIN / "hvd-abs"), "launch", "horovod", "--min-np", "1", "--max-np", "2", "--hostfile", str(hostfile),
           "--warm", "1" if warm else "0"]
    drive_in_place(cmd, args, out,
                   grow=lambda: hostfile.write_text("localhost slots=2\n"),  # a slot joins the pool: 1 -> 2 in place
                   shrink=lambda: hostfile.write_text("localhost slots=1\n"))  # it leaves again: 2 -> 1 in place
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"event": "resize"' in line]
    by_size = {e["world_size"]: e for e in events}
    return {"join_stall_s": by_size.get(2, {}).get("stall_s"), "leave_stall_s": by_size.get(1, {}).get("stall_s"),
            "resizes": len(events), **update_times(out)}


def launch_horovod(n: int) -> list[str]:
    """A fixed-size job of `n` workers on horovodrun."""
    return [str(BIN / "hvd-abs"), "launch", "horovod", "--min-np", str(n), "--max-np", str(n)]


def restart(args: argparse.Namespace, work: Path, old: int, new: int,
            launch: Callable[[int], list[str]] = launch_horovod, ledgers: list[Path] | None = None,
            on_host: Callable[[list[str]], list[str]] = list) -> dict:
    """Stop at the old size after --k updates (checkpoint), relaunch at the new size with --resume.
    `launch(n)`: the launcher command line for a fixed-size job of n workers; `ledgers`, `on_host`:
    as for drive_in_place."""
    out = work / f"restart-{old}-{new}"
    ledgers = ledgers or [out]
    first = train_args(args, out) + ["--stop-at-update", str(args.k)]
    run = lambda n, extra: subprocess.run(  # noqa: E731
        on_host([*launch(n), "--", *extra]), capture_output=True, text=True, timeout=args.timeout)
    p1 = run(old, first)
    before = ledger(*ledgers)
    second = [a for a in train_args(args, out) if a != "--overwrite"] + ["--resume", str(out), "--stop-at-update", str(2 * args.k)]
    p2 = run(new, second)
    for p in (p1, p2):
        if p.returncode != 0:
            raise RuntimeError(f"restart run failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    after = [r for r in ledger(*ledgers) if r["t"] > before[-1]["t"]]
    last_before = max(r["t"] for r in before if r["update"] == args.k)
    first_after = min(r["t"] for r in after if r["update"] == args.k + 1)
    step = step_time(after)
    return {"stall_s": None if step is None else max(0.0, first_after - last_before - step), "update_s": step}


def stalls(cold: dict, warm: dict, up: dict, down: dict) -> dict:
    """The measured sections and their ratios (in place / restart); shared with bench_resize_ray
    and bench_resize_multihost."""
    ratio = lambda a, b: (a / b) if b else None  # noqa: E731 (a restart stall of 0: no ratio)
    return {"in_place_cold": cold, "in_place_warm": warm, "restart_1_to_2": up, "restart_2_to_1": down,
            "ratio_join_cold": ratio(cold["join_stall_s"], up["stall_s"]),
            "ratio_join_warm": ratio(warm["join_stall_s"], up["stall_s"]),
            "ratio_leave": ratio(warm["leave_stall_s"], down["stall_s"])}


# What `plot` reads from a result ("a.b": key b of section a).
PLOTTED = ("machine", "global_batch", "in_place_cold.join_stall_s", "in_place_cold.leave_stall_s",
           "in_place_warm.join_stall_s", "in_place_warm.leave_stall_s", "restart_1_to_2.stall_s", "restart_2_to_1.stall_s")


def plot(result: dict, path: Path) -> None:
    """Bar chart of the stall per resize: in place (cold, warm) against the restart baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {"1 -> 2 (join)": [result["in_place_cold"]["join_stall_s"], result["in_place_warm"]["join_stall_s"],
                                result["restart_1_to_2"]["stall_s"]],
              "2 -> 1 (leave)": [result["in_place_cold"]["leave_stall_s"], result["in_place_warm"]["leave_stall_s"],
                                 result["restart_2_to_1"]["stall_s"]]}
    labels = ["in place, cold", "in place, warm", "restart"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, label in enumerate(labels):
        ax.bar([g + (i - 1) * 0.27 for g in range(len(groups))], [v[i] for v in groups.values()], 0.27, label=label)
    ax.set_xticks(range(len(groups)), list(groups))
    ax.set_ylabel("stall per resize (s)")
    ax.set_title(f"Resize stalls, ResNet-20 on Cifar-10, global batch {result['global_batch']}, {result['machine']}")
    ax.legend()
    fig.tight_layout()
    savefig_atomic(fig, path, dpi=100)  # a crash leaves the previous figure whole
    plt.close(fig)


def _has(tree: object, dotted: str) -> bool:
    """Whether nested dicts `tree` hold the key path "a.b"."""
    for key in dotted.split("."):
        if not isinstance(tree, dict) or key not in tree:
            return False
        tree = tree[key]
    return True


def _get(tree: dict, dotted: str) -> object:
    """The value at the key path "a.b" of nested dicts `tree` (which `_has`)."""
    for key in dotted.split("."):
        tree = tree[key]
    return tree


def load_result(p: argparse.ArgumentParser, path: Path) -> dict:
    """The result JSON at `path` (for --plot-only), or exit 2 naming the file and what is wrong."""
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        p.error(f"--plot-only: cannot read {path} ({exc.strerror}); run the benchmark first, or pass --out "
                f"to the JSON it wrote")
    except ValueError:  # not UTF-8, or not JSON
        p.error(f"--plot-only: {path} is not JSON; pass --out to the JSON the benchmark wrote")
    missing = [key for key in PLOTTED if not _has(result, key)]
    if missing:
        p.error(f"--plot-only: {path} is not a bench_resize result (no {', '.join(missing[:3])}); pass --out "
                f"to the JSON the benchmark wrote")
    unmeasured = [key for key in PLOTTED if _get(result, key) is None]
    if unmeasured:  # a bar of 0 would pass a missing stall off as none
        p.error(f"--plot-only: {path} lacks measurements ({', '.join(unmeasured[:3])} are null); rerun the "
                f"benchmark")
    return result


RESIZE_UPDATES = 4  # updates a resize may take to take effect once asked for (see check_job_options)


def check_job_options(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit 2 on a job option that would fail only inside the launched job (or, --timeout, never
    stop it); shared with bench_resize_ray."""
    for name in ("train_subset", "base_batch", "epochs", "k", "timeout"):
        value = getattr(args, name)
        if not value > 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {value}")
    # Updates are full global batches (2 x base each); the job must outlast both resizes. A resize
    # takes effect some updates after it is asked for (the new host list is polled once a second and
    # applied at the next commit). On 2 busy cores (--k 2, --train-subset 512) a join took 1 more
    # update, a leave 2: with 2 x --k + 2 updates in all the job often ended before the leave, and with
    # 2 x --k + 4 it once did; 4 per resize leaves twice what was seen.
    updates = args.epochs * (args.train_subset // (2 * args.base_batch))
    need = 2 * (args.k + RESIZE_UPDATES)
    if updates < need:
        p.error(f"the job runs {updates} updates (--epochs x --train-subset // (2 x --base-batch)) but the two "
                f"resizes need at least 2 x (--k + {RESIZE_UPDATES}) = {need} (--k before each, about "
                f"{RESIZE_UPDATES} for it to take effect): raise --epochs or --train-subset, or lower --k")


def job_options(p: argparse.ArgumentParser, out: str) -> None:
    """The options of the benchmarked job (`train_args`) and of its timing; shared with bench_resize_ray."""
    add_data_dir(p)
    p.add_argument("--train-subset", type=int, default=4096)
    p.add_argument("--base-batch", type=int, default=128)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--k", type=int, default=6, help="updates before each resize")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / out))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    job_options(p, "resize.json")
    p.add_argument("--plot-only", action="store_true", help="redraw the plot from the --out JSON")
    args = p.parse_args()
    check_job_options(p, args)
    out = Path(args.out)
    check_out(p, out)  # --plot-only too: the figure goes beside it
    figure = out.with_suffix(".png")
    if out == figure:
        p.error(f"--out {out}: the figure goes beside the JSON as .png and would replace it; pass a .json --out")
    check_out(p, figure, "--out's figure")
    if args.plot_only:
        plot(load_result(p, out), figure)
        return 0
    from hvd_abs.data import load_dataset

    # A data dir without CIFAR-10: one line now, not tracebacks from every worker; also builds the
    # decode cache once, before the workers.
    load_dataset("cifar10", data_dir=args.data_dir)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="hvd_abs_resize_") as tmp:
        work = Path(tmp)
        # Each checked as soon as it is measured: a missing one stops the benchmark there.
        cold = measured("in place, cold", in_place(args, work, warm=False))
        warm = measured("in place, warm", in_place(args, work, warm=True))
        up = measured("restart 1 -> 2", restart(args, work, 1, 2))
        down = measured("restart 2 -> 1", restart(args, work, 2, 1))
    # A full Cifar-10 run: 90 epochs of 50,000 samples at the measured update time on 2 workers.
    full_run_s = 90 * 50_000 / (2 * args.base_batch) * warm["update_s_2"]
    result = {
        "machine": f"{os.cpu_count()} CPU cores, CPU only", "model": "resnet20", "data": "cifar10 JPEG subset",
        "train_subset": args.train_subset, "global_batch": 2 * args.base_batch, "updates_before_resize": args.k,
        **stalls(cold, warm, up, down),
        "full_run_s_estimate": full_run_s,
        "share_of_full_run_warm": (warm["join_stall_s"] + warm["leave_stall_s"]) / full_run_s,
        "share_of_full_run_restart": (up["stall_s"] + down["stall_s"]) / full_run_s,
        "targets": {"ratio": 0.15, "share": 0.003}, "bench_s": time.time() - t0,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(result, indent=2) + "\n")  # a crash leaves the previous file whole
    plot(result, figure)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    from hvd_abs.errors import user_errors_exit_2

    sys.exit(user_errors_exit_2(main)())  # bad input (a data dir, a flag): one line, exit 2
