"""The paper's claim on real data: SGD vs a fixed large batch vs ABS vs ABSA on CIFAR-10.

One command runs the study (issue 8):

    python benchmarks/abs_study.py --protocol quick            # ~2 h on a 2-core CPU (estimate)
    python benchmarks/abs_study.py --protocol full --device cuda --models resnet20 --jobs 8

Runs, for every model (c1, resnet20) and seed (same epoch budget and seeds for all):
  sgd        the small-batch baseline: fixed batch 128 (the base batch), the model's base LR.
  sgd_large  a fixed large batch L with linear LR scaling: --method sgd --batch L --lr base*L/128
             (for sgd the trainer applies --lr as given at --batch; see hvd_abs/batching/lr.py:
             the growth scale is global_batch / initial_batch = 1 for a fixed batch).
  abs        adaptive batch from 128, Hessian-triggered doubling up to the cap, LR x2 per doubling.
  absa       abs + FGSM adversarial samples (ratio 0.2, eps 0.005, halved per doubling).
  The controls (medium's defaults, any protocol with --methods):
  sgd_large_warmup  sgd_large with Goyal et al.'s linear LR warm-up (5 of 90 epochs, scaled).
  absa_schedule     absa growing every --duration epochs, no Hessian check (the fallback alone).
  absa_gns          absa growing on the gradient noise scale (--growth-trigger gns); micro-batches
                    of 64 so that the first 128 batch holds the two sizes the estimate compares.

Protocols (what differs from the paper is said in `protocol["shortened"]` of the JSON):
  full   the paper: 90 epochs, all 50,000 training images, step decay x0.2 at 30, 60 (C1, lr 0.02)
         or 30, 60, 80 (ResNet-20, lr 0.1), max batch 16,384, duration 10, fixed large batch 4,096,
         test accuracy on all 10,000 test images every epoch.
  quick  sized for ~2 h of a 2-core CPU: 8 epochs on a fixed random subset of 8,192 training images
         (the same subset for every run); decay epochs, duration and batch sizes scaled with it:
         decays at round(d * E / 90), duration max(1, round(10 * E / 90)), max batch the largest
         128 * 2^k <= N / 4 (16,384 / 50,000 is about 1/3), large batch = max batch / 4 (as 4,096 vs
         16,384). Per-epoch test accuracy on a fixed 2,000-image test subset; the final accuracy
         of every run is on all 10,000 test images.
  medium where the growth signal can act: 24 epochs on a fixed 16,384-image subset (checks every
         epoch, the fallback only every 3), sized as quick otherwise (max batch 4,096: 32x the
         base); about 15-25 min a run here. All seven methods by default.
Flags override single knobs (--epochs, --train-subset, --eval-subset, --models, --seeds, --methods).

Each run is a child process (`--run-one`) writing a normal run dir (metrics.jsonl, summary.json,
plots.png) plus result.json under --runs-dir; `--jobs K` runs K at once (useful on a GPU, where one
small model leaves it mostly idle). The parent then writes <out>/<name>.json as
{"runs": [...], "protocol": {...}, "table": [...], "targets": {...}}, three plots
(<name>_acc_vs_updates.png, <name>_batch_vs_epoch.png, <name>_eig.png), and prints a markdown table.
`--collect-only` rebuilds the JSON, plots and table from an existing --runs-dir (e.g. copied back
from another machine). Nothing in the outputs is typed in by hand: every number comes from a run.

In pieces (a machine lent for minutes at a time): every run writes a checkpoint at each epoch end
(removed when it finishes); `--stop-after-s S` stops all runs at their first epoch end past S
seconds, and running the same command again on the same --runs-dir continues each unfinished run
from its checkpoint, exactly as if it had not stopped (tests/test_abs_study.py). Carry the runs
dir between machines (tar it, newest checkpoints only: about 2.2 MB per ResNet-20 run).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from _args import add_data_dir, check_device  # noqa: E402 (benchmarks/, beside this file)
from hvd_abs.atomic import savefig_atomic, write_text_atomic  # noqa: E402 (after the path)
from hvd_abs.errors import UserError  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
METHODS = ("sgd", "sgd_large", "sgd_large_warmup", "abs", "absa", "absa_schedule", "absa_gns")
PAPER_METHODS = ("sgd", "sgd_large", "abs", "absa")  # quick and full: the paper's comparison
GNS_BASE_BATCH = 64  # absa_gns: two 64-sample micro-batches in the first 128 batch, for its two sizes
MODELS = ("c1", "resnet20")
BASE_BATCH = 128
# The paper's per-model recipe (shared notes, HessianFlow defaults), in 90-epoch terms.
RECIPES = {
    "c1": {"lr": 0.02, "decay_epochs": (30, 60)},
    "resnet20": {"lr": 0.1, "decay_epochs": (30, 60, 80)},
}
PAPER_EPOCHS = 90
PAPER_DURATION = 10
PAPER_MAX_BATCH = 16384
PAPER_LARGE_BATCH = 4096
FULL_TRAIN = 50000
QUICK = {"epochs": 8, "train_subset": 8192, "eval_subset": 2000}
# Where the growth signal can act: a check every epoch, a fallback doubling only every 3 checks.
MEDIUM = {"epochs": 24, "train_subset": 16384, "eval_subset": 2000}
GOYAL_WARMUP = 5  # epochs of linear LR warm-up in 90 (Goyal et al. 2017), scaled to the protocol


# --- the protocol --------------------------------------------------------------------------------
def pow2_batch_at_most(limit: float) -> int:
    """Largest BASE_BATCH * 2^k <= limit (at least BASE_BATCH)."""
    b = BASE_BATCH
    while b * 2 <= limit:
        b *= 2
    return b


def make_protocol(args: argparse.Namespace) -> dict[str, Any]:
    """Every knob of the study, derived from --protocol and the overriding flags."""
    full = args.protocol == "full"
    sized = MEDIUM if args.protocol == "medium" else QUICK
    epochs = args.epochs or (PAPER_EPOCHS if full else sized["epochs"])
    n_train = args.train_subset or (FULL_TRAIN if full else sized["train_subset"])
    n_train = min(n_train, FULL_TRAIN)
    eval_subset = args.eval_subset if args.eval_subset is not None else (0 if full else sized["eval_subset"])
    if n_train >= FULL_TRAIN:
        max_batch, large = PAPER_MAX_BATCH, PAPER_LARGE_BATCH
    else:
        max_batch = pow2_batch_at_most(n_train / 4)
        large = max(BASE_BATCH, max_batch // 4)
    duration = PAPER_DURATION if epochs == PAPER_EPOCHS else max(1, round(PAPER_DURATION * epochs / PAPER_EPOCHS))
    models = {}
    for m in args.models:
        recipe = RECIPES[m]
        decays = sorted({round(d * epochs / PAPER_EPOCHS) for d in recipe["decay_epochs"]} - {0})
        decays = [d for d in decays if 0 < d < epochs]
        models[m] = {"lr": recipe["lr"], "decay_epochs": decays, "lr_decay": 0.2,
                     "large_batch_lr": recipe["lr"] * large / BASE_BATCH}
    from hvd_abs.training import DEFAULT_EIG_SAMPLES

    eig_samples = args.eig_samples or DEFAULT_EIG_SAMPLES
    shortened = []
    if epochs != PAPER_EPOCHS:
        shortened.append(f"{epochs} epochs instead of {PAPER_EPOCHS} (LR decay epochs and the duration "
                         f"fallback scaled by {epochs}/{PAPER_EPOCHS})")
    if n_train < FULL_TRAIN:
        shortened.append(f"{n_train} of the 50000 training images (fixed random subset); max batch "
                         f"{max_batch} instead of {PAPER_MAX_BATCH} and fixed large batch {large} instead of "
                         f"{PAPER_LARGE_BATCH}, scaled to the subset")
    if eval_subset:
        shortened.append(f"per-epoch test accuracy on a fixed {eval_subset}-image test subset "
                         f"(final accuracy on all 10000)")
    return {
        "name": args.protocol, "dataset": f"cifar10 (real JPEG images, {Path(args.data_dir).resolve()})",
        "epochs": epochs, "train_samples": n_train, "eval_subset": eval_subset or None,
        "base_batch": BASE_BATCH, "max_batch": max_batch, "large_batch": large, "duration": duration,
        "models": models, "methods": list(args.methods), "seeds": list(args.seeds),
        "warmup_epochs": GOYAL_WARMUP * epochs / PAPER_EPOCHS, "gns_base_batch": GNS_BASE_BATCH,
        "eig": f"trainer defaults (stochastic power iteration, tol 1e-2, <= 10 iter) on {eig_samples} samples",
        "eig_samples": eig_samples,
        "adversarial": "trainer defaults for absa (FGSM eps 0.005, ratio 0.2 halved per doubling, off from E/2)",
        "momentum": 0.9, "weight_decay": 0.0, "augmentation": "none (as the reference)",
        "normalisation": "per-channel mean/std inside the model (hvd_abs.models)",
        "shortened": shortened or ["nothing: the paper's protocol"],
        "device": args.device,
    }


def run_config(proto: dict[str, Any], model: str, method: str, seed: int, out: Path, args: argparse.Namespace,
               resume: bool = False):
    """The TrainConfig of one run (resume: continue the one in `out` from its newest checkpoint).
    Its subsets are the trainer's own (--train-subset, --test-subset: seed 12345, the same for
    every run); a checkpoint at every epoch end lets a run cut short continue."""
    from hvd_abs.training import DEFAULT_EIG_SAMPLES, TrainConfig

    m = proto["models"][model]
    common = dict(dataset="cifar10", data_dir=args.data_dir, model=model, epochs=proto["epochs"],
                  base_batch=BASE_BATCH, lr_decay=m["lr_decay"], lr_decay_epochs=m["decay_epochs"],
                  duration=proto["duration"], eig_samples=proto.get("eig_samples", DEFAULT_EIG_SAMPLES),
                  train_subset=proto["train_samples"] if proto["train_samples"] < FULL_TRAIN else None,
                  test_subset=proto["eval_subset"] or None, checkpoint_every=1,
                  seed=seed, out=str(out), overwrite=not resume, resume=str(out) if resume else None,
                  quiet=True, device=args.device, threads=args.threads)
    if method == "sgd":
        return TrainConfig(method="sgd", batch=BASE_BATCH, lr=m["lr"], max_batch=BASE_BATCH, **common)
    if method in ("sgd_large", "sgd_large_warmup"):
        L = proto["large_batch"]
        warmup = proto.get("warmup_epochs", 0.0) if method == "sgd_large_warmup" else 0.0
        return TrainConfig(method="sgd", batch=L, lr=m["large_batch_lr"], max_batch=L, warmup_epochs=warmup, **common)
    trigger = {"absa_schedule": "schedule", "absa_gns": "gns"}.get(method, "hessian")
    if method == "absa_gns":
        common["base_batch"] = proto.get("gns_base_batch", GNS_BASE_BATCH)
    return TrainConfig(method=method.split("_")[0], batch=BASE_BATCH, lr=m["lr"], max_batch=proto["max_batch"],
                       growth_trigger=trigger, **common)


# --- one run (child process) ------------------------------------------------------------------------
class _TimeUp(Exception):
    """--stop-after-s passed: leave the run at an epoch end, to be continued."""


def _study_callback(args: argparse.Namespace, run: tuple[str, str, int], out: Path, full: Any,
                    load_s: float, t_load: float) -> Any:
    """What the study adds to a run (hvd_abs.training.Callback): a partial result.json after every
    epoch, the --stop-after-s limit at epoch ends (after that epoch's checkpoint), and at the end
    the accuracy on the whole test split (the per-epoch one may be on a subset)."""
    from hvd_abs.training import Callback

    model, method, seed = run

    class Study(Callback):
        def __init__(self) -> None:
            self.t_start = time.perf_counter()
            self.result: dict[str, Any] | None = None

        def record(self, trainer, test_acc: float, test_loss: float | None, test_samples: int, complete: bool,
                   final_eval_s: float | None = None) -> dict[str, Any]:
            hist, cfg = trainer.history, trainer.cfg
            return {
                "method": method, "model": model, "seed": seed, "complete": complete,
                "test_acc": test_acc, "test_loss": test_loss, "test_samples": test_samples,
                "updates": trainer.updates, "wall_s": trainer.elapsed_s,
                "max_batch_reached": max(h["global_batch"] for h in hist),
                "initial_batch": cfg.initial_batch, "lr": cfg.lr, "epochs": len(hist),
                "epochs_planned": cfg.epochs, "num_growths": trainer.controller.num_growths,
                "growths": [{k: g[k] for k in ("epoch", "updates", "old_batch", "new_batch", "reason")}
                            for g in trainer.growths],
                "second_order_s": trainer.second_order_total_s, "final_eval_s": final_eval_s,
                "data_load_s": load_s, "process_s": time.perf_counter() - self.t_start,
                "samples_seen": trainer.samples_seen,
                "train_samples_per_s": statistics.median(h["samples_per_s"] for h in hist),
                "final_train_acc": hist[-1]["train_acc"],
                "curve": [{k: h[k] for k in ("epoch", "updates", "global_batch", "lr", "eig", "adv_ratio", "train_loss",
                                              "train_acc", "test_acc", "epoch_s", "second_order_s")} for h in hist],
                "curve_test_samples": int(trainer.data.test_y.shape[0]),
                "device": args.device, "run_dir": str(out),
            }

        def on_epoch_logged(self, trainer, record: dict[str, Any]) -> None:
            print(f"  {model} {method} s{seed} epoch {record['epoch']}: G={record['global_batch']} "
                  f"updates={record['updates']} test_acc={record['test_acc']:.4f} eig={record['eig']} "
                  f"{record['epoch_s']:.1f}s", flush=True)
            # A partial result after every epoch: a run cut short (a time limit) still reports how far it got.
            partial = self.record(trainer, record["test_acc"], record["test_loss"], int(trainer.data.test_y.shape[0]),
                                  complete=False)
            write_text_atomic(out / "result.json", json.dumps(partial, indent=1) + "\n")

        def on_epoch_end(self, trainer) -> None:
            out_of_time = args.stop_after_s is not None and time.perf_counter() - t_load >= args.stop_after_s
            if out_of_time and trainer.epoch < trainer.cfg.epochs:
                raise _TimeUp

        def on_fit_end(self, trainer, summary: dict[str, Any]) -> None:
            t_eval = time.perf_counter()
            test_loss, test_acc = trainer.evaluate(test=(full.test_x, full.test_y))
            self.result = self.record(trainer, test_acc, test_loss, int(full.test_y.shape[0]), complete=True,
                                      final_eval_s=time.perf_counter() - t_eval)

    return Study()


def run_one(args: argparse.Namespace) -> None:
    """Train one (model, method, seed) through the same session as `hvd-abs train`, and write
    result.json into its run dir."""
    from hvd_abs.comm import LocalComm
    from hvd_abs.data import load_dataset
    from hvd_abs.training import CHECKPOINT_DIR, Session
    from hvd_abs.training.checkpoint import load_latest

    proto = json.loads(Path(args.run_one_protocol).read_text())
    model, method, seed = args.run_one.split(":")
    seed = int(seed)
    out = Path(args.runs_dir) / f"{model}_{method}_s{seed}"
    t_load = time.perf_counter()
    full = load_dataset("cifar10", data_dir=args.data_dir)
    if args.device != "cpu":  # the whole set on the GPU once: no per-batch host copies
        full = dataclasses.replace(full, train_x=full.train_x.to(args.device), train_y=full.train_y.to(args.device),
                                   test_x=full.test_x.to(args.device), test_y=full.test_y.to(args.device))
    load_s = time.perf_counter() - t_load
    # A run cut short (--stop-after-s, a killed job) continues from its newest epoch checkpoint
    # that verifies; without one (a new run, or a kill during the first save) it starts over.
    # --rerun: the parent has removed the run dir.
    resume = load_latest(out / CHECKPOINT_DIR) is not None
    cfg = run_config(proto, model, method, seed, out, args, resume=resume)
    study = _study_callback(args, (model, method, seed), out, full, load_s, t_load)
    session = Session(cfg, comm=LocalComm(), data=full, callbacks=[study])
    try:
        session.run()
    except _TimeUp:
        print(f"stopped {model} {method} s{seed} after epoch {session.trainer.epoch} of {cfg.epochs} "
              f"(--stop-after-s); the next study run continues it", flush=True)
        return
    result = study.result
    write_text_atomic(out / "result.json", json.dumps(result, indent=1) + "\n")
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)  # only a run to be continued needs them
    print(f"done {model} {method} s{seed}: test_acc={result['test_acc']:.4f} updates={result['updates']} "
          f"wall={result['wall_s']:.0f}s max_batch={result['max_batch_reached']}", flush=True)


# --- the study (parent) -------------------------------------------------------------------------------
def launch_all(args: argparse.Namespace, proto: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Every missing or unfinished run as a child process, --jobs at a time. No launches after
    --deadline-s; with --stop-after-s every run stops at its first epoch end past that many
    seconds from the study's start (a checkpoint there: the next study run continues it).
    Returns the protocol and the runs that failed."""
    # Decode (or read the cache of) the data once, before children race to build the cache, and
    # before anything is written: a wrong --data-dir leaves no runs dir behind.
    from hvd_abs.data import load_dataset

    load_dataset("cifar10", data_dir=args.data_dir)
    runs_dir = Path(args.runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    proto_path = runs_dir / "protocol.json"
    if proto_path.exists() and not args.rerun:
        # Finished runs are kept and unfinished ones continued: only under the same protocol.
        old = read_json(proto_path)
        diff = protocol_diff(old, proto)
        if diff:
            print(f"abs_study: {runs_dir} holds runs of another protocol ({'; '.join(diff)}): pass --rerun to "
                  f"start them over, or another --runs-dir", file=sys.stderr)
            raise SystemExit(2)
        proto = {**proto, "models": {**old["models"], **proto["models"]}}  # models run earlier stay in the table
    write_text_atomic(proto_path, json.dumps(proto, indent=1))
    if not args.rerun:
        kept = keep_finished(runs_dir, proto, Path(args.out) / f"{args.name}.json")
        if kept:
            print(f"kept {kept} finished runs from {Path(args.out) / args.name}.json (their run dirs were gone)",
                  flush=True)
    # Order: seed-major, so a cut-short study still has every method for the first seed(s).
    todo = [(m, meth, s) for s in args.seeds for m in args.models for meth in args.methods]
    if args.rerun:
        for m, meth, s in todo:  # start over: nothing of an earlier run may be continued or reported
            shutil.rmtree(runs_dir / f"{m}_{meth}_s{s}", ignore_errors=True)
    else:
        todo = [t for t in todo if not _complete(runs_dir / f"{t[0]}_{t[1]}_s{t[2]}" / "result.json")]
    t0 = time.perf_counter()
    running: list[tuple[subprocess.Popen, str]] = []
    failed: list[str] = []
    base = [sys.executable, str(Path(__file__).resolve()), "--runs-dir", str(runs_dir), "--device", args.device,
            "--data-dir", args.data_dir, "--run-one-protocol", str(proto_path)]
    if args.threads:
        base += ["--threads", str(args.threads)]
    while todo or running:
        while todo and len(running) < args.jobs:
            elapsed = time.perf_counter() - t0
            stop = args.stop_after_s is not None and elapsed >= args.stop_after_s
            if (args.deadline_s and elapsed > args.deadline_s) or stop:
                print(f"deadline reached: {len(todo)} runs not started", flush=True)
                todo = []
                break
            m, meth, s = todo.pop(0)
            key = f"{m}:{meth}:{s}"
            print(f"start {key}", flush=True)
            extra = [] if args.stop_after_s is None else ["--stop-after-s", str(args.stop_after_s - elapsed)]
            running.append((subprocess.Popen(base + ["--run-one", key] + extra), key))
        time.sleep(1.0)
        for p, key in list(running):
            if p.poll() is not None:
                running.remove((p, key))
                if p.returncode != 0:
                    print(f"run {key} failed with exit code {p.returncode}", flush=True)
                    failed.append(key)
    print(f"all runs finished in {time.perf_counter() - t0:.0f}s", flush=True)
    return proto, failed


# What makes two studies' runs comparable (descriptions, the device and the model list may differ).
PROTOCOL_KNOBS = ("epochs", "train_samples", "eval_subset", "base_batch", "max_batch", "large_batch", "duration",
                  "eig_samples")


def protocol_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The knobs in which two protocols differ, as 'knob old -> new' (empty: runs are comparable)."""
    from hvd_abs.training import DEFAULT_EIG_SAMPLES

    def knob(p: dict[str, Any], k: str) -> Any:  # protocols from before --eig-samples used the default
        return p.get(k, DEFAULT_EIG_SAMPLES) if k == "eig_samples" else p.get(k)

    diff = [f"{k} {knob(old, k)} -> {knob(new, k)}" for k in PROTOCOL_KNOBS if knob(old, k) != knob(new, k)]
    for m in sorted(set(old["models"]) & set(new["models"])):  # a model's recipe: LR, decays, large-batch LR
        if old["models"][m] != new["models"][m]:
            diff.append(f"{m} recipe {old['models'][m]} -> {new['models'][m]}")
    return diff


def keep_finished(runs_dir: Path, proto: dict[str, Any], results: Path) -> int:
    """Write back the result.json of each finished run in `results` (a JSON the study wrote under
    the same protocol) whose run dir is gone: pieces run on other machines or checkouts add up."""
    if not results.is_file():
        return 0
    saved = read_json(results)
    if "protocol" not in saved or protocol_diff(saved["protocol"], proto):
        return 0
    kept = 0
    for r in saved.get("runs", []):
        run_dir = runs_dir / f"{r['model']}_{r['method']}_s{r['seed']}"
        if r.get("complete") and not run_dir.exists():
            run_dir.mkdir(parents=True)
            write_text_atomic(run_dir / "result.json", json.dumps(r, indent=1) + "\n")
            kept += 1
    return kept


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object the study wrote; UserError naming the file when it is damaged."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is damaged ({exc.__class__.__name__}): delete that run's folder and run the "
                        f"study again to redo it") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} is not a JSON object: delete that run's folder and run the study again")
    return obj


def _complete(path: Path) -> bool:
    return path.exists() and read_json(path).get("complete", False)


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def collect(args: argparse.Namespace, proto: dict[str, Any] | None) -> dict[str, Any]:
    """Read every result.json under --runs-dir; table, targets, plots, JSON."""
    runs_dir = Path(args.runs_dir)
    if proto is None or args.collect_only:
        if not (runs_dir / "protocol.json").is_file():
            print(f"abs_study: {runs_dir} holds no study (no protocol.json): pass the --runs-dir of a study "
                  f"to --collect-only", file=sys.stderr)
            raise SystemExit(2)
        proto = read_json(runs_dir / "protocol.json")
    found = sorted((read_json(p) for p in runs_dir.glob("*/result.json")),
                   key=lambda r: (r["model"], METHODS.index(r["method"]), r["seed"]))
    if not found:
        print(f"abs_study: no run under {runs_dir} has a result.json: nothing to collect, nothing written",
              file=sys.stderr)
        raise SystemExit(1)
    # Only finished runs enter the table; runs cut short are listed apart with how far they got.
    runs = [r for r in found if r.get("complete", True)]
    incomplete = [{k: r[k] for k in ("method", "model", "seed", "epochs", "epochs_planned", "updates",
                                     "test_acc", "max_batch_reached", "wall_s")} for r in found if not r.get("complete", True)]
    table = []
    for model in proto["models"]:
        for method in METHODS:
            rs = [r for r in runs if r["model"] == model and r["method"] == method]
            if not rs:
                continue
            acc_m, acc_s = mean_std([100 * r["test_acc"] for r in rs])
            table.append({"model": model, "method": method, "seeds": [r["seed"] for r in rs],
                          "test_acc_mean": acc_m, "test_acc_std": acc_s,
                          "updates_mean": statistics.fmean(r["updates"] for r in rs),
                          "wall_s_mean": statistics.fmean(r["wall_s"] for r in rs),
                          "max_batch_reached": max(r["max_batch_reached"] for r in rs),
                          "growths_by_eig_mean": statistics.fmean(
                              sum(g["reason"] == "eig" for g in r["growths"]) for r in rs),
                          "growths_by_signal_mean": statistics.fmean(
                              sum(g["reason"] in ("eig", "gns") for g in r["growths"]) for r in rs),
                          "growths_by_fallback_mean": statistics.fmean(
                              sum(g["reason"] == "duration" for g in r["growths"]) for r in rs),
                          "second_order_share_mean": statistics.fmean(
                              r["second_order_s"] / max(r["wall_s"], 1e-9) for r in rs),
                          "growths_mean": statistics.fmean(r["num_growths"] for r in rs),
                          "second_order_s_mean": statistics.fmean(r["second_order_s"] for r in rs)})
    targets = {}
    for model in proto["models"]:
        row = {t["method"]: t for t in table if t["model"] == model}
        if "sgd" not in row:
            continue
        base = row["sgd"]
        entry: dict[str, Any] = {}
        for method in ("abs", "absa", "absa_schedule", "absa_gns"):
            if method in row:
                r = row[method]
                entry[method] = {
                    "update_reduction": base["updates_mean"] / r["updates_mean"],
                    "acc_minus_baseline_points": r["test_acc_mean"] - base["test_acc_mean"],
                    "met_5x_fewer_updates": base["updates_mean"] / r["updates_mean"] >= 5.0,
                    "met_acc_within_0.3": r["test_acc_mean"] >= base["test_acc_mean"] - 0.3}
        if "absa" in row and "sgd_large" in row:
            entry["absa_minus_large_batch_points"] = row["absa"]["test_acc_mean"] - row["sgd_large"]["test_acc_mean"]
        targets[model] = entry
    # With runs cut short, the fair comparison is at the last epoch that every run of a model reached.
    at_common: list[dict[str, Any]] = []
    if incomplete:
        for model in proto["models"]:
            rs = [r for r in found if r["model"] == model]
            if not rs:
                continue
            e = min(len(r["curve"]) for r in rs)
            for method in METHODS:
                sel = [r["curve"][e - 1] for r in rs if r["method"] == method]
                if sel:
                    at_common.append({"model": model, "method": method, "epoch": e, "seeds": len(sel),
                                      "test_acc_mean": 100 * statistics.fmean(c["test_acc"] for c in sel),
                                      "updates_mean": statistics.fmean(c["updates"] for c in sel),
                                      "global_batch_max": max(c["global_batch"] for c in sel)})
        print("\nat the last epoch every run reached (per-epoch test set):")
        for a in at_common:
            print(f"  {a['model']} {a['method']}: epoch {a['epoch']}, acc {a['test_acc_mean']:.2f}%, "
                  f"updates {a['updates_mean']:.0f}, batch {a['global_batch_max']}")
    result = {"runs": runs, "incomplete_runs": incomplete, "at_common_epoch": at_common, "protocol": proto, "table": table, "targets": targets,
              "machine": args.machine or f"{platform.node()} ({os.cpu_count()} CPUs), device {proto.get('device')}",
              "collected_on": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                       "torch": _torch_version(), "device": proto.get("device")},
              "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:])}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plots = plot(found, out, args.name, proto)  # curves of cut-short runs too; a failure here leaves the JSON
    write_text_atomic(out / f"{args.name}.json", json.dumps(result, indent=1) + "\n")
    print(markdown_table(table, proto))
    print("\ntargets:", json.dumps(targets, indent=1))
    if incomplete:
        print("\nincomplete runs (cut short, not in the table):", json.dumps(incomplete, indent=1))
    print(f"\nwrote {out / (args.name + '.json')} and {', '.join(str(p) for p in plots)}")
    return result


def _torch_version() -> str:
    import torch

    return torch.__version__


def markdown_table(table: list[dict[str, Any]], proto: dict[str, Any]) -> str:
    """The README table: accuracy mean +- std over seeds, updates, wall time, max batch."""
    label = {"sgd": "SGD, batch 128 (baseline)", "sgd_large": f"SGD, fixed batch {proto['large_batch']} (linear LR)",
             "sgd_large_warmup": f"SGD, fixed batch {proto['large_batch']} (linear LR, warm-up)",
             "abs": "ABS", "absa": "ABSA", "absa_schedule": "ABSA, fixed doubling schedule",
             "absa_gns": "ABSA, gradient-noise trigger"}
    lines = ["| model | method | seeds | test acc % (mean +- std) | updates | vs baseline | wall s | max batch |",
             "|---|---|---|---|---|---|---|---|"]
    base = {t["model"]: t["updates_mean"] for t in table if t["method"] == "sgd"}
    for t in table:
        red = f"{base[t['model']] / t['updates_mean']:.2f}x fewer" if t["model"] in base else "n/a"
        lines.append(f"| {t['model']} | {label[t['method']]} | {len(t['seeds'])} | {t['test_acc_mean']:.2f} +- "
                     f"{t['test_acc_std']:.2f} | {t['updates_mean']:.0f} | {red} | {t['wall_s_mean']:.0f} | "
                     f"{t['max_batch_reached']} |")
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], out: Path, name: str, proto: dict[str, Any]) -> list[Path]:
    """Accuracy vs updates, batch vs epoch, eigenvalue vs epoch: one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    models = [m for m in proto["models"] if any(r["model"] == m for r in runs)]
    colors = {"sgd": "C0", "sgd_large": "C1", "sgd_large_warmup": "C4", "abs": "C2", "absa": "C3",
              "absa_schedule": "C5", "absa_gns": "C6"}
    paths = []
    specs = [("acc_vs_updates", "updates", "test_acc", "parameter updates", "test accuracy (per-epoch eval set)", "log", None),
             ("batch_vs_epoch", "epoch", "global_batch", "epoch", "global batch", None, 2),
             ("eig", "epoch", "eig", "epoch", "top Hessian eigenvalue (epoch end)", None, 10)]
    for tag, xk, yk, xl, yl, xscale, ylog in specs:
        if not models:
            break
        fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.2), squeeze=False)
        for ax, model in zip(axes[0], models):
            for r in runs:
                if r["model"] != model:
                    continue
                pts = [(c[xk], c[yk]) for c in r["curve"] if c[yk] is not None]
                if not pts:
                    continue
                ls = "-" if r["seed"] == min(proto["seeds"]) else "--"
                ax.plot(*zip(*pts), ls, marker="o", ms=2.5, color=colors[r["method"]],
                        label=f"{r['method']} s{r['seed']}")
            ax.set_title(f"{model}, CIFAR-10 ({proto['name']}: {proto['epochs']} ep, {proto['train_samples']} imgs)")
            ax.set_xlabel(xl)
            ax.set_ylabel(yl)
            if xscale:
                ax.set_xscale(xscale)
                ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # no overlapping labels
            if ylog:
                ax.set_yscale("log", base=ylog)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"{name}_{tag}.png"
        savefig_atomic(fig, path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--protocol", choices=("quick", "medium", "full"), default="quick")
    p.add_argument("--models", default="c1,resnet20", help="comma-separated: c1, resnet20")
    p.add_argument("--methods", default=None, help="comma-separated: " + ", ".join(METHODS) + " (default: medium "
                                                   "all of them; quick and full " + ", ".join(PAPER_METHODS) + ")")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--epochs", type=int, default=None, help="override the protocol's epochs")
    p.add_argument("--train-subset", type=int, default=None, help="training images (default: protocol's)")
    p.add_argument("--eval-subset", type=int, default=None,
                   help="test images for the per-epoch accuracy (0: all; final accuracy always on all)")
    p.add_argument("--eig-samples", type=int, default=None,
                   help="training samples per epoch-end eigenvalue estimate (default: the trainer's, 1024)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (child processes)")
    p.add_argument("--deadline-s", type=float, default=0, help="start no run after this many seconds (0: none)")
    p.add_argument("--stop-after-s", type=float, default=None,
                   help="stop every run at its first epoch end past this many seconds (checkpointed; running "
                        "the study again continues it): the full protocol in pieces of a time-limited machine")
    add_data_dir(p)
    p.add_argument("--runs-dir", default=None, help="run dirs (default runs/abs_study_<protocol>)")
    p.add_argument("--out", default=str(RESULTS), help="where the JSON and plots go")
    p.add_argument("--name", default="abs_study", help="file stem of the JSON and plots")
    p.add_argument("--machine", default=None, help="where the runs ran, recorded in the JSON (default: this host)")
    p.add_argument("--rerun", action="store_true", help="redo runs that already have a result.json")
    p.add_argument("--collect-only", action="store_true", help="only rebuild JSON/plots/table from --runs-dir")
    p.add_argument("--run-one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--run-one-protocol", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.run_one is None:
        args.models = [m.strip() for m in args.models.split(",") if m.strip()]
        if args.methods is None:
            args.methods = ",".join(METHODS if args.protocol == "medium" else PAPER_METHODS)
        args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        try:
            args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            p.error(f"--seeds takes comma-separated integers (e.g. 0,1), got {args.seeds!r}")
        if not args.seeds:
            p.error("--seeds is empty: pass e.g. --seeds 0,1")
        if not all(-2**63 <= s < 2**64 for s in args.seeds):
            p.error(f"--seeds must be whole numbers from -2**63 to 2**64-1, got {args.seeds}")
        for flag, value, least in (("--epochs", args.epochs, 1), ("--train-subset", args.train_subset, 1),
                                   ("--eval-subset", args.eval_subset, 0), ("--jobs", args.jobs, 1),
                                   ("--threads", args.threads, 1)):
            if value is not None and value < least:  # (None: the protocol's own value)
                p.error(f"{flag} must be >= {least}, got {value}")
        for m in args.models:
            if m not in MODELS:
                p.error(f"--models: unknown model {m!r}; choose from {', '.join(MODELS)}")
        for m in args.methods:
            if m not in METHODS:
                p.error(f"--methods: unknown method {m!r}; choose from {', '.join(METHODS)}")
        if args.stop_after_s is not None and not args.stop_after_s > 0:
            p.error(f"--stop-after-s must be > 0 seconds, got {args.stop_after_s}")
        if args.eig_samples is not None and args.eig_samples < 1:
            p.error(f"--eig-samples must be >= 1, got {args.eig_samples}")
        check_device(p, args.device)
        if len(args.seeds) < 2:
            print("warning: fewer than 2 seeds; the table's mean is over one run", file=sys.stderr)
    if args.runs_dir is None:
        args.runs_dir = str(ROOT / "runs" / f"abs_study_{args.protocol}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.run_one is not None:
        run_one(args)
        return
    proto = None
    if not args.collect_only:
        proto = make_protocol(args)
        print(json.dumps(proto, indent=1), flush=True)
        proto, failed = launch_all(args, proto)
        if failed:
            # A partial table must not replace the last complete one: the finished runs stay in the
            # runs dir, and the same command again retries only what is missing.
            print(f"abs_study: {len(failed)} runs failed ({', '.join(failed)}; their errors are above): "
                  f"{Path(args.out) / args.name}.json not written. Fix the cause and run the same command "
                  f"again (finished runs are kept), or --collect-only for a table of what finished.",
                  file=sys.stderr)
            raise SystemExit(1)
    collect(args, proto)


if __name__ == "__main__":
    from hvd_abs.errors import user_errors_exit_2

    user_errors_exit_2(main)()  # bad input (a data dir, a flag): one line, exit 2
