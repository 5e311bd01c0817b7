"""Benchmark of the second-order engine on a CIFAR ResNet-20 (batch 128, random data).

Prints one JSON object and writes it to benchmarks/results/hessian.json (or --out):

1. ``hvp``: seconds per Hessian-vector product for each method over seconds per gradient
   (forward + backward). Target: <= 2.0 for the best method.
2. ``eigen``: top-3 at tol 1e-3, Lanczos vs power iteration with deflation: products, wall time,
   eigenvalues vs a converged reference (Lanczos at tol 1e-6). Target: Lanczos <= 1/4 of power's
   wall time, sorted, within 1e-3 relative of the reference.
3. ``vector_phase``: one CGS2 orthonormalisation against 30 basis vectors, plus a multi-dot and
   a Ritz-vector combination, as the Lanczos solver does them: native vs foreach vs loop.
   Targets: CPU native >= 2x foreach and >= 5x loop; GPU native >= 3x loop.
4. ``distributed``: top-3 over 256 samples with 2 Horovod workers vs 1 (horovodrun, Gloo,
   one thread per worker): the wall-time ratio. CPU only.

    python benchmarks/bench_hessian.py [--device cpu|cuda] [--skip eigen,distributed] [--out PATH]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _args import check_device, check_out  # noqa: E402 (benchmarks/, beside this file)
from hvd_abs.atomic import write_text_atomic  # noqa: E402
from hvd_abs.second_order import HessianOperator, top_eigenvalues, vecops  # noqa: E402

PARTS = ("hvp", "eigen", "vectors", "distributed")


def build_resnet20() -> nn.Module:
    from hvd_abs.models import build_model

    return build_model("resnet20", 10, (3, 32, 32))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str, repeats: int, burn_in: int = 1) -> float:
    """Median seconds of ``repeats`` calls after ``burn_in`` untimed ones."""
    for _ in range(burn_in):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_hvp(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], device: str, repeats: int) -> dict:
    """Seconds per gradient and per product of each method, timed in turns (gradient, reuse,
    double_backward, forward_over_reverse, again) so a change in machine load hits all alike;
    medians of `repeats` turns. The ratios are taken from the same turns."""
    crit = nn.CrossEntropyLoss()
    x, y = batch
    params = [p for p in model.parameters() if p.requires_grad]
    model.eval()

    def grad() -> None:
        torch.autograd.grad(crit(model(x), y), params)

    methods = ("reuse", "double_backward", "forward_over_reverse")
    out: dict[str, object] = {}
    with contextlib.ExitStack() as stack:
        ops = {}
        for method in methods:
            t0 = time.perf_counter()
            ops[method] = stack.enter_context(HessianOperator(model, crit, [batch], method=method))
            sync(device)
            out[f"{method}_setup_s"] = time.perf_counter() - t0  # "reuse" builds the gradient graph once, here
        v = ops["reuse"].random(torch.Generator().manual_seed(0))
        calls = {"grad": grad, **{m: (lambda H=ops[m]: H(v)) for m in methods}}
        times: dict[str, list[float]] = {name: [] for name in calls}
        for turn in range(repeats + 1):  # the first turn warms up, untimed
            for name, fn in calls.items():
                t0 = time.perf_counter()
                fn()
                sync(device)
                if turn:
                    times[name].append(time.perf_counter() - t0)
    out["grad_s"] = statistics.median(times["grad"])
    ratios = {}
    for method in methods:
        out[f"{method}_s"] = statistics.median(times[method])
        # Per turn, then the median: a load spike in one turn does not skew the ratio.
        ratios[method] = statistics.median(h / g for h, g in zip(times[method], times["grad"]))
    out["ratio_to_grad"] = ratios
    best = min(ratios, key=ratios.get)  # type: ignore[arg-type]
    out["best"] = best
    out["target_best_ratio_le_2"] = ratios[best] <= 2.0
    return out


def bench_eigen(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict:
    crit = nn.CrossEntropyLoss()
    ref = top_eigenvalues(model, crit, [batch], k=3, tol=1e-6, max_iter=300)
    res = {"reference": {"eigenvalues": ref.eigenvalues, "num_hvps": ref.num_hvps, "converged": ref.converged,
                         "tol": 1e-6}}
    for method in ("lanczos", "power"):
        r = top_eigenvalues(model, crit, [batch], k=3, tol=1e-3, max_iter=100, method=method)
        rel = [abs(a - b) / abs(b) for a, b in zip(r.eigenvalues, ref.eigenvalues)]
        res[method] = {"eigenvalues": r.eigenvalues, "num_hvps": r.num_hvps, "seconds": r.seconds,
                       "converged": r.converged, "max_rel_err_vs_reference": max(rel),
                       "sorted": r.eigenvalues == sorted(r.eigenvalues, reverse=True)}
    lz, pw = res["lanczos"], res["power"]
    res["lanczos_over_power_time"] = lz["seconds"] / pw["seconds"]
    res["target_met"] = bool(res["lanczos_over_power_time"] <= 0.25 and lz["sorted"]
                             and lz["max_rel_err_vs_reference"] <= 1e-3)
    return res


def bench_vector_phase(model: nn.Module, device: str, k: int, repeats: int, dtype: torch.dtype) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(0)

    def rand() -> list[torch.Tensor]:
        return [torch.randn(p.shape, generator=gen, dtype=dtype).to(device) for p in params]

    ops_native = vecops.get("native")
    basis: list[list[torch.Tensor]] = []
    for _ in range(k):  # an orthonormal basis, built the way the solver builds it
        w = rand()
        ops_native.orthonormalize_(w, basis)
        basis.append(w)
    w0 = rand()
    coeffs = torch.randn(k, generator=gen, dtype=torch.float64)
    res: dict[str, object] = {"basis_vectors": k, "tensors": len(params), "numel": sum(p.numel() for p in params),
                              "dtype": str(dtype).replace("torch.", "")}
    for name in ("native", "foreach", "loop"):
        ops = vecops.get(name)
        work = [t.clone() for t in w0]
        out = [torch.empty_like(t) for t in w0]

        def step() -> None:
            # What one Lanczos step does to vectors: CGS2 of the new product against the basis
            # (multi-dot, subtract, twice, normalise), plus one Ritz-vector combination.
            for a, b in zip(work, w0):
                a.copy_(b)
            ops.orthonormalize_(work, basis)
            ops.lincomb_(out, basis, coeffs, beta=0.0)

        res[f"{name}_s"] = timed(step, device, repeats if name != "loop" else max(3, repeats // 3), burn_in=2)
    res["native_vs_foreach"] = res["foreach_s"] / res["native_s"]  # type: ignore[operator]
    res["native_vs_loop"] = res["loop_s"] / res["native_s"]  # type: ignore[operator]
    if device == "cpu":
        res["target_met"] = bool(res["native_vs_foreach"] >= 2 and res["native_vs_loop"] >= 5)
    else:
        res["target_met"] = bool(res["native_vs_loop"] >= 3)
    return res


def bench_distributed() -> dict:
    exe = Path(sys.executable).parent / "horovodrun"
    horovodrun = str(exe) if exe.exists() else shutil.which("horovodrun")
    if horovodrun is None:
        return {"skipped": "horovodrun not found"}
    worker = ROOT / "tests" / "workers" / "hessian_dist_worker.py"
    res: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for np_ in (1, 2):
            out = Path(tmp) / f"np{np_}.json"
            cmd = [horovodrun, "-np", str(np_), "-H", f"localhost:{np_}", "--gloo", "--network-interface", "lo",
                   sys.executable, str(worker), "bench", str(out)]
            env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
            if proc.returncode != 0:
                return {"error": f"horovodrun -np {np_} failed: {proc.stderr[-2000:]}"}
            res[f"workers_{np_}"] = json.loads(out.read_text())
    one, two = res["workers_1"], res["workers_2"]
    res["wall_ratio_2_over_1"] = two["seconds"] / one["seconds"]  # type: ignore[index]
    res["same_products"] = one["num_hvps"] == two["num_hvps"]  # type: ignore[index]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: all)")
    ap.add_argument("--repeats", type=int, default=7, help="timed turns of the HVP measurement (median; 3 turns spread 1.8-2.0x)")
    ap.add_argument("--vector-repeats", type=int, default=15, help="timed repeats per vector-phase measurement")
    ap.add_argument("--basis", type=int, default=30, help="basis vectors in the vector phase")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: hvp,eigen,vectors,distributed")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "hessian.json"))
    args = ap.parse_args()
    check_device(ap, args.device)
    for flag, value in (("--threads", args.threads), ("--repeats", args.repeats),
                        ("--vector-repeats", args.vector_repeats), ("--basis", args.basis)):
        if value < 1:
            ap.error(f"{flag} must be >= 1, got {value}")
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = sorted(skip - set(PARTS))
    if unknown:
        ap.error(f"--skip: unknown part {unknown[0]!r}; choose from {','.join(PARTS)}")
    # distributed is CPU only: on cuda it is skipped anyway.
    if not set(PARTS) - skip - ({"distributed"} if args.device == "cuda" else set()):
        ap.error("--skip leaves nothing to measure (a report of nothing would replace the last one); skip fewer parts")
    check_out(ap, Path(args.out))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = args.device
    model = build_resnet20().to(device)
    gen = torch.Generator().manual_seed(0)
    batch = (torch.rand(128, 3, 32, 32, generator=gen).to(device), torch.randint(0, 10, (128,), generator=gen).to(device))
    report: dict[str, object] = {
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "model": "resnet20",
        "params": sum(p.numel() for p in model.parameters()), "param_tensors": len(list(model.parameters())),
        "batch": 128, "vecops": vecops.backend_info(),
    }
    if "vectors" not in skip:
        report["vector_phase"] = {
            "float32": bench_vector_phase(model, device, args.basis, args.vector_repeats, torch.float32),
            "float64": bench_vector_phase(model, device, args.basis, args.vector_repeats, torch.float64),
        }
        print(json.dumps({"vector_phase": report["vector_phase"]}), file=sys.stderr)
    if "hvp" not in skip:
        report["hvp"] = bench_hvp(model, batch, device, args.repeats)
        print(json.dumps({"hvp": report["hvp"]}), file=sys.stderr)
    if "eigen" not in skip:
        report["eigen"] = bench_eigen(model, batch)
        print(json.dumps({"eigen": report["eigen"]}), file=sys.stderr)
    if "distributed" not in skip and device == "cpu":
        report["distributed"] = bench_distributed()
    text = json.dumps(report, indent=2)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, text + "\n")  # a crash leaves the previous report whole


if __name__ == "__main__":
    from hvd_abs.errors import user_errors_exit_2

    user_errors_exit_2(main)()  # bad input (a data dir, a flag): one line, exit 2
