"""A fixed-size horovod.ray.RayExecutor allreduce across 2 Ray actors on a local 2-CPU Ray.

Prints one JSON line with each worker's (rank, size, sum). Run as a script so a hung Ray start
is bounded by the caller's timeout and never leaks into the pytest process.
"""
import json

import ray
from horovod.ray import RayExecutor


def allreduce() -> tuple[int, int, float]:
    import horovod.torch as hvd
    import torch

    hvd.init()
    total = hvd.allreduce(torch.tensor([float(hvd.rank() + 1)]), op=hvd.Sum)
    return hvd.rank(), hvd.size(), total.item()


if __name__ == "__main__":
    # address="local": never join a stale cluster left in Ray's temp dir (see notes).
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        settings = RayExecutor.create_settings(timeout_s=60)
        executor = RayExecutor(settings, num_workers=2, cpus_per_worker=1, use_gpu=False)
        executor.start()
        try:
            results = executor.run(allreduce)
        finally:
            executor.shutdown()
    finally:
        ray.shutdown()
    print(json.dumps(sorted(results)))
