"""Does the toolkit cost anything? Trainer.step vs a plain Horovod loop, and the ABS/ABSA split.

One run: `horovodrun -np W --gloo --network-interface lo -H localhost:W` for each world size W
(default 1 and 2) starts this file as workers. In every worker, on the same model (C1 by default),
the same CIFAR-10 data, the same per-worker batch (128, so the global batch is 128 * W) and the
same torch thread count (cores / W, the trainer's own policy), single updates alternate between:

  plain    the textbook Horovod loop: hvd.DistributedOptimizer (gradient allreduce hooked into
           backward), hvd.broadcast_parameters, mean cross-entropy, optimizer.step();
  trainer  `hvd-abs train --method sgd`'s update: hvd_abs.training.Trainer.step() over HorovodComm
           (one fused grouped allreduce of the gradients and the step statistics after backward).

After `--warmup` untimed updates of each, `--pairs` pairs of single updates are timed, alternating
plain/trainer in ABBA order so that a shared, noisy machine loads both alike (each timed update is
bracketed by barriers, and by a CUDA sync on a GPU). samples/s = global batch / median update time
(the trainer's own samples_per_s is samples over training seconds, the same quantity); the ratio is
plain median / trainer median. `ratio_vs_plain_horovod` in the JSON is the lowest per-world ratio.

Then, with the ABS/ABSA machinery on (`--method abs` and `absa` Trainers, at batch 128 per worker):
the update's time with FGSM on (adversarial time measured around AdversarialSchedule.apply), and
one epoch-end eigenvalue estimate (Trainer.estimate_eig, the trainer's defaults); reported as
seconds per epoch of 50,000 samples at the initial batch (the costliest epoch: 390 updates, ratio
0.2, one estimate) split into training, second-order and adversarial, and the samples/s they give.

Writes benchmarks/results/throughput.json (or --out). Usage:
    python benchmarks/bench_throughput.py [--worlds 1,2] [--model c1] [--pairs 30]
    python benchmarks/bench_throughput.py --local --device cuda --model resnet20   # no Horovod: vs plain PyTorch
    python benchmarks/bench_throughput.py --local --model resnet20 --precision bf16 --out /tmp/bf16.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from _args import add_data_dir, check_device, check_out  # noqa: E402 (benchmarks/, beside this file)
from hvd_abs.atomic import write_text_atomic  # noqa: E402
from hvd_abs.data.streaming import take  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "throughput.json"
PER_WORKER = 128
EPOCH_SAMPLES = 50000


def _threads(world: int) -> int:
    return max(1, (os.cpu_count() or 1) // world)  # as Trainer.set_threads for world > 1


def worker(args: argparse.Namespace) -> None:
    """One Horovod worker: alternate plain/trainer updates, then the ABS/ABSA split; rank 0 writes JSON."""
    # The trainers' out dirs (metrics, checkpoints) are scratch: removed however the worker ends.
    with tempfile.TemporaryDirectory(prefix="bench_tp_", ignore_cleanup_errors=True) as tmp:
        _measure(args, Path(tmp))


def _measure(args: argparse.Namespace, tmp: Path) -> None:
    """The body of `worker`; the trainers write their out dirs under `tmp`."""
    import torch
    import torch.nn.functional as F

    from hvd_abs.comm import HorovodComm, LocalComm, worker_device
    from hvd_abs.data import load_dataset
    from hvd_abs.models import build_model
    from hvd_abs.training import TrainConfig, Trainer

    if args.local:  # one process, no Horovod: plain torch loop vs Trainer.step over LocalComm
        hvd = None
        comm = LocalComm()
        W, rank = 1, 0
    else:
        import horovod.torch as hvd

        comm = HorovodComm()  # hvd.init()
        W, rank = hvd.size(), hvd.rank()
    torch.set_num_threads(args.threads or (_threads(W) if W > 1 else torch.get_num_threads()))
    threads = torch.get_num_threads()
    device = worker_device(args.device, comm.local_rank)  # the Trainer pins the same GPU
    if device.type == "cuda":
        torch.cuda.set_device(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()
        if hvd is not None:
            hvd.barrier()

    data = load_dataset("cifar10", data_dir=args.data_dir)
    if device.type != "cpu":  # the whole set on the GPU once, for both loops alike
        import dataclasses

        data = dataclasses.replace(data, train_x=data.train_x.to(device), train_y=data.train_y.to(device),
                                   test_x=data.test_x.to(device), test_y=data.test_y.to(device))
    G = PER_WORKER * W

    def make_trainer(method: str) -> Trainer:
        cfg = TrainConfig(method=method, dataset="cifar10", data_dir=args.data_dir, model=args.model,
                          epochs=90, base_batch=PER_WORKER, batch=G, max_batch=max(G, 16384), lr=0.02,
                          seed=0, out=str(tmp / method), overwrite=True, quiet=True, device=args.device,
                          precision=args.precision)
        return Trainer(cfg, comm=comm, data=data)

    # The plain loop: same model and initial weights, its own optimizer.
    torch.manual_seed(0)
    model = build_model(args.model, data.num_classes, data.in_shape, mean=data.mean, std=data.std).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.02 * W, momentum=0.9)
    if hvd is not None:
        opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters())
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    perm = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(0))
    cursor = [0]

    def plain_step() -> None:
        start = cursor[0] % (len(perm) - G)
        idx = perm[start + rank * PER_WORKER: start + (rank + 1) * PER_WORKER]  # this rank's share
        cursor[0] += G
        model.train()
        opt.zero_grad()
        x, y = take(data.train_x, idx), data.train_y[idx]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            logits = model(x).float()  # (the textbook autocast loop at bf16; a no-op cast at fp32)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        opt.step()
        # The same per-step statistics a real loop logs (loss, accuracy) so both do the same work.
        _ = (loss.item(), (logits.argmax(1) == y).sum().item())

    trainer = make_trainer("sgd")
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)

    def trainer_step() -> None:
        if not trainer.step():  # the epoch ran out: start the next one
            trainer.sampler.new_epoch()
            trainer.step()

    def timed(fn, steps: int) -> float:
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        sync()
        return time.perf_counter() - t0

    for fn in (plain_step, trainer_step):
        timed(fn, args.warmup)
    # Single updates, alternating plain/trainer (ABBA order): load spikes from other users of the
    # machine hit neighbouring steps alike, and medians drop the spikes.
    times: dict[str, list[float]] = {"plain_step": [], "trainer_step": []}
    for i in range(args.pairs):
        for fn in ((plain_step, trainer_step) if i % 2 == 0 else (trainer_step, plain_step)):
            times[fn.__name__].append(timed(fn, 1))
    plain_med = statistics.median(times["plain_step"])
    trainer_med = statistics.median(times["trainer_step"])

    # ABS / ABSA: the update with FGSM on, and one epoch-end estimate.
    split = {}
    for method in () if args.no_split else ("abs", "absa"):
        t = make_trainer(method)
        t.controller.global_batch = G  # (already G: the initial batch)
        adv_s = [0.0]
        apply = t.adv.apply

        def timed_apply(*a, _apply=apply, **k):
            t0 = time.perf_counter()
            out = _apply(*a, **k)
            adv_s[0] += time.perf_counter() - t0
            return out

        t.adv.apply = timed_apply
        timed(t.step, args.warmup)
        adv_s[0] = 0.0
        n_abs = max(3, args.pairs // 3)
        step_s = timed(t.step, n_abs) / n_abs
        adv_per_step = adv_s[0] / n_abs
        sync()
        eig, n_eig, eig_s = t.estimate_eig()
        eig_s = max(comm.allgather_object(eig_s))  # the slowest rank sets the pace
        updates = EPOCH_SAMPLES // G
        train_epoch = updates * (step_s - adv_per_step)
        adv_epoch = updates * adv_per_step
        total = train_epoch + adv_epoch + eig_s
        split[method] = {
            "step_s": step_s, "adversarial_s_per_step": adv_per_step, "second_order_s_per_estimate": eig_s,
            "eig_samples": n_eig, "eig": eig,
            "epoch_updates": updates,
            "epoch_training_s": train_epoch, "epoch_adversarial_s": adv_epoch, "epoch_second_order_s": eig_s,
            "epoch_total_s": total,
            "share": {"training": train_epoch / total, "adversarial": adv_epoch / total, "second_order": eig_s / total},
            "samples_per_s_training_only": G / (step_s - adv_per_step),
            "samples_per_s_with_machinery": updates * G / total,
        }

    if rank == 0:
        out = {"world_size": W, "local": args.local, "device": args.device, "precision": args.precision,
               "global_batch": G,
               "per_worker_batch": PER_WORKER, "threads_per_worker": threads, "model": args.model,
               "pairs": args.pairs, "warmup_steps": args.warmup,
               "plain_step_s": times["plain_step"], "trainer_step_s": times["trainer_step"],
               "plain_samples_per_s": G / plain_med, "trainer_samples_per_s": G / trainer_med,
               "ratio_vs_plain_horovod": plain_med / trainer_med,
               "ratio_of_means": statistics.fmean(times["plain_step"]) / statistics.fmean(times["trainer_step"]),
               "abs_split": split}
        Path(args.worker_out).write_text(json.dumps(out, indent=1))


def _horovodrun(args: argparse.Namespace, hosts: list[str] | None, world: int) -> list[str]:
    """horovodrun's argv for `world` workers: on this machine over lo, or one on each of `hosts`
    (through hvd_abs.launch.horovodrun, as `hvd-abs launch horovod` runs it across hosts)."""
    if not hosts:
        return [str(Path(sys.executable).with_name("horovodrun")), "-np", str(world), "--gloo",
                "--network-interface", "lo", "-H", f"localhost:{world}"]
    from hvd_abs.launch.hosts import choose_interface

    nic = choose_interface(hosts, None)
    return [sys.executable, "-m", "hvd_abs.launch.horovodrun", *(f"--ssh-option={o}" for o in args.ssh_option), "--",
            "-np", str(world), "--gloo", "--network-interface", nic, "-H", ",".join(f"{h}:1" for h in hosts),
            *(["--ssh-identity-file", args.ssh_identity_file] if args.ssh_identity_file else [])]


def parse_worlds(text: str) -> list[int]:
    """`--worlds` "1,2" -> [1, 2]; ValueError saying what to pass."""
    worlds = [w.strip() for w in text.split(",")]
    if not all(w.isdecimal() and int(w) >= 1 for w in worlds):
        raise ValueError(f"--worlds must be a comma list of world sizes >= 1, e.g. 1,2; got {text!r}")
    return [int(w) for w in worlds]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worlds", default="1,2")
    p.add_argument("--model", default="c1", choices=("c1", "resnet20", "cnn"))
    p.add_argument("--pairs", type=int, default=30, help="timed (plain, trainer) update pairs, alternating")
    p.add_argument("--warmup", type=int, default=3, help="untimed updates of each before timing")
    add_data_dir(p)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                   help="bf16: both loops' forward passes under torch.autocast (hvd-abs train --precision bf16)")
    p.add_argument("--local", action="store_true",
                   help="one process without Horovod: a plain torch loop vs Trainer.step (e.g. on a GPU host "
                        "without Horovod); the ratio is then vs plain PyTorch, not vs plain Horovod")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per worker (default: the trainer's policy, the cores / the world size)")
    p.add_argument("--no-split", action="store_true", help="skip the ABS/ABSA split (plain vs trainer only)")
    p.add_argument("--hosts", default=None,
                   help="HOST,HOST,...: one worker on each (over ssh; the interface found as `hvd-abs launch "
                        "horovod` finds it) instead of --worlds on this machine")
    p.add_argument("--ssh-identity-file", default=None, help="with --hosts: ssh private key for the hosts")
    p.add_argument("--ssh-option", action="append", default=[], metavar="OPTION",
                   help="with --hosts: an ssh -o option for every connection (repeatable)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    # Checked before any data load or launch: a bad flag costs seconds, not a run.
    try:
        worlds = parse_worlds(args.worlds)
    except ValueError as exc:
        p.error(str(exc))
    if args.pairs < 1:
        p.error(f"--pairs must be >= 1, got {args.pairs}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.threads < 0:
        p.error(f"--threads must be >= 0 (0: the trainer's policy), got {args.threads}")
    hosts = [h.strip() for h in args.hosts.split(",")] if args.hosts else None
    if hosts is not None and (not all(hosts) or args.local):
        p.error("--hosts takes HOST,HOST,... (one worker on each), and not with --local")
    if not args.worker:
        check_out(p, Path(args.out))
    if not args.worker:
        check_device(p, args.device)
    if args.worker:
        worker(args)
        return
    if args.local:
        with tempfile.TemporaryDirectory() as d:
            args.worker_out = str(Path(d) / "w.json")
            worker(args)
            res = json.loads(Path(args.worker_out).read_text())
        res["ratio_vs_plain_pytorch"] = res.pop("ratio_vs_plain_horovod")
        import torch

        doc = {"ratio_vs_plain_pytorch": res["ratio_vs_plain_pytorch"], "results": [res],
               "host": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None},
               "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:])}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.out, json.dumps(doc, indent=1) + "\n")  # a crash leaves the previous file whole
        print(json.dumps(doc, indent=1))
        return
    from hvd_abs.data import load_dataset

    load_dataset("cifar10", data_dir=args.data_dir)  # build the decode cache once, before the workers
    results = []
    for W in [len(hosts)] if hosts else worlds:
        with tempfile.TemporaryDirectory() as d:
            wout = Path(d) / "w.json"
            cmd = [*_horovodrun(args, hosts, W), sys.executable, str(Path(__file__).resolve()), "--worker",
                   "--worker-out", str(wout), "--model", args.model, "--pairs", str(args.pairs), "--warmup",
                   str(args.warmup), "--data-dir", args.data_dir, "--device", args.device,
                   "--precision", args.precision, "--threads", str(args.threads), *(["--no-split"] if args.no_split else [])]
            print("$", " ".join(cmd), flush=True)
            code = subprocess.call(cmd)
            if code != 0 or not wout.exists():  # its own output above says why; nothing is written
                print(f"bench_throughput: horovodrun -np {W} failed (exit {code}; its output is above): "
                      f"{args.out} not written", file=sys.stderr)
                raise SystemExit(1)
            res = json.loads(wout.read_text())
        print(json.dumps({k: v for k, v in res.items() if k != "abs_split"}, indent=1), flush=True)
        results.append(res)
    import torch

    doc = {"ratio_vs_plain_horovod": min(r["ratio_vs_plain_horovod"] for r in results),
           "ratio_by_world_size": {str(r["world_size"]): r["ratio_vs_plain_horovod"] for r in results},
           "target": 0.95, "results": results,
           "host": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "load_avg_at_end": os.getloadavg()},
           "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:])}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, json.dumps(doc, indent=1) + "\n")
    print(json.dumps({k: doc[k] for k in ("ratio_vs_plain_horovod", "ratio_by_world_size")}, indent=1))
    for r in results:
        for m, s in r.get("abs_split", {}).items():
            print(f"W={r['world_size']} {m}: epoch {s['epoch_total_s']:.0f}s = training {s['share']['training']:.0%}, "
                  f"adversarial {s['share']['adversarial']:.0%}, second-order {s['share']['second_order']:.0%}; "
                  f"{s['samples_per_s_with_machinery']:.0f} samples/s with machinery vs "
                  f"{s['samples_per_s_training_only']:.0f} training only")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    from hvd_abs.errors import user_errors_exit_2

    user_errors_exit_2(main)()  # bad input (a data dir, a flag): one line, exit 2
