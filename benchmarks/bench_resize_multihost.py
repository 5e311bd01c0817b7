"""Resize stalls and throughput across hosts: horovodrun over ssh on a 3-host namespace cluster.

scripts/local_cluster.sh makes hosts 1..3 (network namespaces on this machine, each with its own
address, sshd and disk; needs root). The launcher runs on host 1, as a user's would; the workers
run on hosts 2 and 3, so rank 0 is on another host than the launcher and every output travels
through the launcher's job service. Same job as bench_resize (ResNet-20, a Cifar-10 subset, sgd at
a global batch of 2 x --base-batch).

- in place, warm and cold (`--warm 1` / `--warm 0`): the hostfile names host 2; after --k updates
  host 3 is added (a worker joins over ssh: into a standby the launcher started there, or cold);
  after --k more it is removed (a worker leaves). Stalls: the job's own `resize` events.
- restart: a job on host 2 stopped at --k (checkpoint in the launcher's OUT), relaunched on hosts
  2 and 3 with --resume; and the reverse. Stall as in bench_resize.
- throughput: bench_throughput.py across hosts 1 and 2 (`--hosts`): Trainer.step against a plain
  horovodrun loop, same model, batch and threads, alternating updates.

Prints one JSON object and writes benchmarks/results/resize_multihost.json. Targets: a warm join
stalls at most 1 s and at most 0.05 of a restart; 2-host throughput at least 0.98 of the plain loop.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _args import check_out  # noqa: E402
from bench_resize import (BIN, REPO, check_job_options, drive_in_place, job_options, measured, restart,  # noqa: E402
                          stalls, update_times)

from hvd_abs.atomic import write_text_atomic  # noqa: E402

SCRIPT = REPO / "scripts" / "local_cluster.sh"


class Hosts:
    """The namespace cluster, up within (removed after, also on failure)."""

    def __init__(self, root: Path, count: int) -> None:
        self.root, self.count = root, count

    def __enter__(self) -> "Hosts":
        done = subprocess.run(["bash", str(SCRIPT), "up", str(self.count), str(self.root)], capture_output=True,
                              text=True, timeout=180)
        if done.returncode != 0:
            raise RuntimeError(f"local_cluster.sh up failed:\n{done.stdout}\n{done.stderr}")
        words = [line.split() for line in done.stdout.splitlines()]
        self.addresses = [w[2] for w in words if w[0] == "host"]
        self.ssh_flags = next(w[1:] for w in words if w[0] == "ssh_flags")
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["bash", str(SCRIPT), "down", str(self.root)], capture_output=True, timeout=120)

    def on(self, i: int):
        """A wrapper that runs an argv on host i (over ssh, in its namespaces)."""
        def wrap(argv: list[str]) -> list[str]:
            command = " ".join(subprocess.list2cmdline([a]) if a else "''" for a in argv)
            return ["bash", str(SCRIPT), "ssh", str(i), str(self.root), "--", f"PYTHONUNBUFFERED=1 {command}"]
        return wrap

    def disk(self, i: int) -> Path:
        """Host i's /srv/hvd, as seen from here."""
        return self.root / "hosts" / f"h{i}"

    def hostfile(self, path: Path, hosts: list[int]) -> Path:
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(f"{self.addresses[i - 1]} slots=1\n" for i in hosts))
        os.replace(tmp, path)  # discovery never reads half a file
        return path


def launcher(hosts: Hosts, hostfile: Path, n_min: int, n_max: int, warm: bool) -> list[str]:
    return [str(BIN / "hvd-abs"), "launch", "horovod", "--hostfile", str(hostfile), *hosts.ssh_flags,
            "--min-np", str(n_min), "--max-np", str(n_max), "--warm", "1" if warm else "0"]


def seen(hosts: Hosts, name: str) -> list[Path]:
    """Where the run dir /srv/hvd/NAME of each host is seen from here."""
    return [hosts.disk(i) / name for i in range(1, hosts.count + 1)]


def in_place(args: argparse.Namespace, hosts: Hosts, warm: bool) -> dict:
    name = "warm" if warm else "cold"
    hostfile = hosts.hostfile(hosts.root / f"hosts-{name}", [2])
    out = Path("/srv/hvd") / name
    drive_in_place(launcher(hosts, hostfile, 1, 2, warm), args, out,
                   grow=lambda: hosts.hostfile(hostfile, [2, 3]), shrink=lambda: hosts.hostfile(hostfile, [2]),
                   ledgers=seen(hosts, name), on_host=hosts.on(1))
    events = [json.loads(line) for line in (hosts.disk(1) / name / "metrics.jsonl").read_text().splitlines()
              if '"event": "resize"' in line]
    by_size = {e["world_size"]: e for e in events}
    merged = hosts.root / f"ledger-{name}"
    (merged / "ledger").mkdir(parents=True)
    for d in seen(hosts, name):
        for f in (d / "ledger").glob("*.jsonl"):
            shutil.copy(f, merged / "ledger" / f.name)
    return {"join_stall_s": by_size.get(2, {}).get("stall_s"), "leave_stall_s": by_size.get(1, {}).get("stall_s"),
            "resizes": len(events), **update_times(merged)}


def restarted(args: argparse.Namespace, hosts: Hosts, old: int, new: int) -> dict:
    pools = {1: [2], 2: [2, 3]}
    name = f"restart-{old}-{new}"

    def launch(n: int) -> list[str]:
        return launcher(hosts, hosts.hostfile(hosts.root / f"hosts-{name}-{n}", pools[n]), n, n, warm=False)

    return restart(args, Path("/srv/hvd"), old, new, launch=launch, ledgers=seen(hosts, name), on_host=hosts.on(1))


def throughput(args: argparse.Namespace, hosts: Hosts, work: Path) -> dict:
    """bench_throughput across hosts 1 and 2, run from host 1."""
    out = work / "throughput.json"
    argv = [sys.executable, str(REPO / "benchmarks" / "bench_throughput.py"), "--model", args.model,
            "--pairs", str(args.pairs), "--threads", "1", "--no-split", "--data-dir", args.data_dir, "--out", str(out),
            "--hosts", f"{hosts.addresses[0]},{hosts.addresses[1]}", *hosts.ssh_flags]
    done = subprocess.run(hosts.on(1)(argv), capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"bench_throughput across hosts failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    result = json.loads(out.read_text())
    return {"ratio_vs_plain_horovod": result["ratio_vs_plain_horovod"], "model": args.model,
            "global_batch": result["results"][0]["global_batch"],
            "samples_per_s": {k: result["results"][0][k] for k in ("plain_samples_per_s", "trainer_samples_per_s")}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    job_options(p, "resize_multihost.json")
    p.add_argument("--model", default="resnet20", choices=("c1", "resnet20", "cnn"),
                   help="the throughput comparison's model")
    p.add_argument("--pairs", type=int, default=40, help="timed (plain, trainer) update pairs for the throughput")
    args = p.parse_args()
    check_job_options(p, args)
    if args.pairs < 1:
        p.error(f"--pairs must be >= 1, got {args.pairs}")
    if os.geteuid() != 0:
        p.error("needs root to make the hosts (network namespaces); run it with sudo")
    out = Path(args.out)
    check_out(p, out)
    from hvd_abs.data import load_dataset

    load_dataset("cifar10", data_dir=args.data_dir)  # one line for a data dir without CIFAR-10; the cache once
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="hvd_abs_resize_mh_") as tmp, Hosts(Path(tmp) / "cluster", 3) as hosts:
        cold = measured("in place, cold", in_place(args, hosts, warm=False))
        warm = measured("in place, warm", in_place(args, hosts, warm=True))
        up = measured("restart 1 -> 2", restarted(args, hosts, 1, 2))
        down = measured("restart 2 -> 1", restarted(args, hosts, 2, 1))
        speed = throughput(args, hosts, Path(tmp))
    result = {
        "machine": f"{os.cpu_count()} CPU cores, CPU only; 3 namespace hosts on it (launcher on host 1, workers "
                   f"on hosts 2 and 3)",
        "model": "resnet20", "data": "cifar10 JPEG subset", "train_subset": args.train_subset,
        "global_batch": 2 * args.base_batch, "updates_before_resize": args.k,
        **stalls(cold, warm, up, down),
        "throughput_2_hosts": speed,
        "targets": {"warm_join_stall_s": 1.0, "ratio_join_warm": 0.05, "throughput_ratio": 0.98},
        "bench_s": time.time() - t0, "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(result, indent=2) + "\n")  # a crash leaves the previous file whole
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    from hvd_abs.errors import user_errors_exit_2

    sys.exit(user_errors_exit_2(main)())  # bad input (a data dir, a flag): one line, exit 2
