"""The streaming input pipeline: delivery rate against the raw decode rate, memory per worker
against the data set's size, and the share of a ResNet-18 update spent waiting for data.

On an ImageNet-like folder (hvd_abs.testing.image_folder: JPEGs of 300-500 px, made once in
the cache); larger sets are that folder's files linked many times (the file list is what a
streaming worker holds, so that is what they test). Each figure is measured in a fresh process:
  decode     images/s of --workers processes decoding the training recipe (rrc-flip) alone
  loader     images/s StreamLoader delivers (--workers loader processes, micro-batch --batch)
  memory     peak RSS of a worker that lists a split of each --sizes and loads 5 micro-batches,
             streamed, and held in memory (decoded at --memory-size px) for comparison
  wait       a ResNet-18 (--image-size px) update at --batch: seconds blocked on the loader / all
Targets (issue 19): loader >= 0.8 of decode; streamed RSS within 10% across sizes; wait < 5%.

Writes benchmarks/results/data_pipeline.json (or --out) and prints it.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from hvd_abs.atomic import write_text_atomic  # noqa: E402


def _grow(base: Path, n: int, cache: Path) -> Path:
    """A folder of n training files (base's, linked round-robin) and base's val split."""
    out = cache / f"{base.name}-x{n}"
    if (out / ".complete").is_file():
        return out
    files = sorted(p for p in (base / "train").rglob("*.JPEG"))
    for k in range(n):
        src = files[k % len(files)]
        dst = out / "train" / src.parent.name / f"{k}_{src.name}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists():
            dst.symlink_to(src)
    if not (out / "val").exists():
        (out / "val").symlink_to(base / "val")
    (out / ".complete").write_text("")
    return out


def _files(folder: Path, size: int):
    """The training split as ImageFiles, without load_dataset's statistics pass (not what is timed)."""
    from hvd_abs.data.image_folder import _scan_image_folder
    from hvd_abs.data.streaming import ImageFiles

    return ImageFiles(_scan_image_folder(folder)[0].paths, (size, size))


def _decode_some(job: tuple[str, int, int, int]) -> int:
    import torch

    torch.set_num_threads(1)  # (one thread a process, as in a loader worker: the same work per core)
    folder, size, start, count = job
    files = _files(Path(folder), size)
    n = len(files)
    for i in range(start, start + count):
        files.decode(i % n, 0, "rrc-flip")
    return count


def decode_rate(folder: Path, size: int, workers: int, images: int) -> float:
    per = images // workers
    with mp.get_context("spawn").Pool(workers) as pool:
        pool.map(_decode_some, [(str(folder), size, 0, 4)] * workers)  # (imports and the scan, not timed)
        t0 = time.perf_counter()
        pool.map(_decode_some, [(str(folder), size, w * per, per) for w in range(workers)])
        return per * workers / (time.perf_counter() - t0)


def loader_rate(folder: Path, size: int, workers: int, batch: int, batches: int) -> float:
    from hvd_abs.data.loader import StreamLoader
    from hvd_abs.sampling import EpochSampler

    files = _files(folder, size)
    sampler = EpochSampler(len(files), seed=0)
    loader = StreamLoader(files, "rrc-flip", workers)
    plan = lambda: sampler.upcoming(batch, batch, 1, 0)  # noqa: E731
    # The first batches come from the queue the workers fill while they start (prefetch 4 each):
    # timed only after it has drained, when each batch waits for its decoding.
    for k in range(workers * 4 + 2 + batches):
        if k == workers * 4 + 2:
            t0 = time.perf_counter()
        if sampler.next_indices(batch) is None:
            sampler.new_epoch()
        loader.get(sampler.next_indices(batch), sampler.epoch, plan)
        sampler.advance(batch)
    return batches * batch / (time.perf_counter() - t0)


def rss_child(folder: str, size: int, loading: str, batch: int) -> None:
    import torch

    from hvd_abs.data import load_dataset
    from hvd_abs.data.streaming import take

    data = load_dataset("imagefolder", folder, image_size=size, loading=loading,
                        cache_dir=os.environ.get("BENCH_CACHE"))
    for k in range(5):
        take(data.train_x, torch.arange(k * batch, (k + 1) * batch))
    # VmHWM, not ru_maxrss: that one keeps the parent's peak across fork and exec.
    print(next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:")))


def peak_rss(folder: Path, size: int, loading: str, batch: int, cache: Path) -> int:
    out = subprocess.run([sys.executable, __file__, "--rss-child", str(folder), str(size), loading, str(batch)],
                         capture_output=True, text=True, check=True, env=dict(os.environ, BENCH_CACHE=str(cache)))
    return int(out.stdout.split()[-1])


def wait_share(folder: Path, size: int, workers: int, batch: int, updates: int) -> dict[str, float]:
    import torch
    import torch.nn.functional as F
    import torchvision

    from hvd_abs.data.loader import StreamLoader
    from hvd_abs.sampling import EpochSampler

    files = _files(folder, size)
    data_y = torch.zeros(len(files), dtype=torch.int64)
    model = torchvision.models.resnet18(num_classes=100)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sampler = EpochSampler(len(files), seed=0)
    loader = StreamLoader(files, "rrc-flip", workers)
    plan = lambda: sampler.upcoming(batch, batch, 1, 0)  # noqa: E731
    waited = total = 0.0
    for u in range(updates + 1):
        t0 = time.perf_counter()
        idx = sampler.next_indices(batch)
        x = loader.get(idx, 0, plan).float().div_(255)
        t1 = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(model(x), data_y[idx]).backward()
        opt.step()
        sampler.advance(batch)
        if u:  # (the first waits for the workers to start)
            waited += t1 - t0
            total += time.perf_counter() - t0
    return {"wait_s": waited, "update_s": total, "share": waited / total}


def main(argv: list[str] | None = None) -> int:
    if argv is None and sys.argv[1:2] == ["--rss-child"]:
        rss_child(sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", default=os.path.expanduser("~/.cache/hvd_abs/bench_data"))
    p.add_argument("--images", type=int, default=2000, help="distinct JPEGs made (100 classes)")
    p.add_argument("--sizes", default="10000,100000", help="training-set sizes of the memory figure")
    p.add_argument("--memory-sizes", default="2000,8000", help="sizes of the in-memory comparison")
    p.add_argument("--memory-size", type=int, default=64, help="image size of the in-memory comparison")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--decode-images", type=int, default=512)
    p.add_argument("--loader-batches", type=int, default=12, help="batches timed after the queue drained")
    p.add_argument("--updates", type=int, default=3, help="ResNet-18 updates timed (0: skip)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "data_pipeline.json"))
    args = p.parse_args(argv)
    from hvd_abs.testing.image_folder import make_image_folder

    cache = Path(args.cache)
    base = make_image_folder(cache, classes=100, train_per_class=max(1, args.images // 100), val_per_class=2)
    res: dict = {"machine": os.uname().nodename, "cpus": len(os.sched_getaffinity(0)), "args": vars(args)}
    res["decode_images_per_s"] = decode_rate(base, args.image_size, args.workers, args.decode_images)
    res["loader_images_per_s"] = loader_rate(base, args.image_size, args.workers, args.batch, args.loader_batches)
    res["loader_vs_decode"] = res["loader_images_per_s"] / res["decode_images_per_s"]
    rss = {}
    for n in (int(s) for s in args.sizes.split(",")):
        rss[f"stream {n}"] = peak_rss(_grow(base, n, cache), args.image_size, "stream", args.batch, cache)
    for n in (int(s) for s in args.memory_sizes.split(",")):
        rss[f"memory {n} at {args.memory_size}px"] = peak_rss(_grow(base, n, cache), args.memory_size, "memory",
                                                              args.batch, cache)
    res["peak_rss_bytes"] = rss
    streamed = [v for k, v in rss.items() if k.startswith("stream")]
    res["stream_rss_spread"] = max(streamed) / min(streamed) - 1
    if args.updates:
        res["resnet18_wait"] = wait_share(base, args.image_size, args.workers, args.batch, args.updates)
    text = json.dumps(res, indent=1)
    write_text_atomic(Path(args.out), text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
