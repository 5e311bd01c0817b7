"""Worker for tests/test_second_order_distributed.py and benchmarks/bench_hessian.py, started by
`horovodrun -np N --gloo`. Every rank gets the same batches; the estimators shard them across
ranks through the auto-detected Horovod comm.

    python hessian_dist_worker.py check OUT.json   # compare with the one-process result (small float64 model)
    python hessian_dist_worker.py bench OUT.json   # time top-3 on ResNet-20 (random data)
"""
from __future__ import annotations

import json
import sys
import time

import horovod.torch as hvd
import torch
from torch import nn

from hvd_abs.second_order import SingleProcess, hessian_density, hessian_trace, hvp, top_eigenvalues


def small_problem() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.Tanh(), nn.Linear(12, 4)).double()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(23, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (23,), generator=gen)
    model.train()
    with torch.no_grad():
        model(x)
    return model, [(x[:7], y[:7]), (x[7:18], y[7:18]), (x[18:], y[18:])]  # 7 + 11 + 5: uneven shards


def check(out: str) -> None:
    model, batches = small_problem()
    v = [torch.randn(p.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
         for p in model.parameters()]
    from hvd_abs.second_order.comm import resolve_comm

    res: dict[str, object] = {"size": hvd.size(), "rank": hvd.rank(), "comm": repr(resolve_comm(None))}
    for name, comm in (("dist", None), ("single", SingleProcess())):
        hv = hvp(model, nn.CrossEntropyLoss(), batches, v, comm=comm)
        eig = top_eigenvalues(model, nn.CrossEntropyLoss(), batches, k=3, tol=1e-8, max_iter=200, comm=comm)
        tr = hessian_trace(model, nn.CrossEntropyLoss(), batches, max_iter=20, comm=comm)
        dens = hessian_density(model, nn.CrossEntropyLoss(), batches, steps=10, probes=2, comm=comm)
        res[name] = {"hvp": torch.cat([t.reshape(-1) for t in hv]).tolist(), "eig": eig.eigenvalues,
                     "eig_hvps": eig.num_hvps, "trace": tr.value, "density": dens.as_dict()}
    # A real CIFAR ResNet-20: its conv weight gradients come back channels-last (non-contiguous),
    # which Horovod would reduce as raw memory if the products were not made dense first.
    from hvd_abs.models import build_model

    torch.manual_seed(0)
    net = build_model("resnet20", 10, (3, 32, 32))
    gen = torch.Generator().manual_seed(0)
    xb, yb = torch.rand(10, 3, 32, 32, generator=gen), torch.randint(0, 10, (10,), generator=gen)
    w = [torch.randn(p.shape, generator=gen) for p in net.parameters()]
    a = hvp(net, nn.CrossEntropyLoss(), [(xb, yb)], w)
    b = hvp(net, nn.CrossEntropyLoss(), [(xb, yb)], w, comm=SingleProcess())
    fa, fb = torch.cat([t.reshape(-1) for t in a]), torch.cat([t.reshape(-1) for t in b])
    res["resnet20_hvp_rel_err"] = float((fa - fb).norm() / fb.norm())
    if hvd.rank() == 0:
        with open(out, "w") as f:
            json.dump(res, f)


def bench(out: str) -> None:
    from hvd_abs.models import build_model

    torch.set_num_threads(1)  # one core per worker: the comparison is 1 worker vs 2 on 2 cores
    torch.manual_seed(0)
    model = build_model("resnet20", 10, (3, 32, 32))
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(256, 3, 32, 32, generator=gen), torch.randint(0, 10, (256,), generator=gen)
    batches = [(x[:128], y[:128]), (x[128:], y[128:])]
    top_eigenvalues(model, nn.CrossEntropyLoss(), [(x[:8], y[:8])], k=1, max_iter=2)  # burn-in
    t0 = time.perf_counter()
    res = top_eigenvalues(model, nn.CrossEntropyLoss(), batches, k=3, tol=1e-3, max_iter=100)
    wall = time.perf_counter() - t0
    if hvd.rank() == 0:
        with open(out, "w") as f:
            json.dump({"size": hvd.size(), "seconds": wall, "num_hvps": res.num_hvps,
                       "eigenvalues": res.eigenvalues, "threads_per_worker": 1, "samples": 256}, f)


if __name__ == "__main__":
    hvd.init()
    {"check": check, "bench": bench}[sys.argv[1]](sys.argv[2])
