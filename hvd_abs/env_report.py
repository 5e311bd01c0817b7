"""What `hvd-abs env` reports: versions and builds of the pieces a run depends on."""
from __future__ import annotations

import platform
from typing import Any


def _horovod() -> dict[str, Any]:
    """Horovod's build, read through the same API `horovodrun --check-build` uses."""
    try:
        import horovod
        from horovod.common import util as hu
    except Exception as exc:  # noqa: BLE001 - report any import failure, never crash
        return {"version": None, "error": f"{type(exc).__name__}: {exc}"}
    frameworks = {"TensorFlow": "tensorflow", "PyTorch": "torch", "MXNet": "mxnet"}
    ops = {"NCCL": hu.nccl_built, "DDL": hu.ddl_built, "CCL": hu.ccl_built, "MPI": hu.mpi_built,
           "Gloo": hu.gloo_built}
    return {
        "version": horovod.__version__,
        "frameworks": [name for name, ext in frameworks.items() if hu.extension_available(ext)],
        "controllers": [name for name, ok in (("MPI", hu.mpi_built()), ("Gloo", hu.gloo_built())) if ok],
        "tensor_operations": [name for name, built in ops.items() if built()],
        "cuda_built": bool(hu.extension_available("torch") and _torch_cuda_built()),
    }


def _torch_cuda_built() -> bool:
    import horovod.torch as hvd

    return bool(hvd.cuda_built())


def _ray() -> str | None:
    try:
        import ray
    except Exception:  # noqa: BLE001
        return None
    return ray.__version__


def collect() -> dict[str, Any]:
    import torch
    import torchvision

    from hvd_abs.second_order import vecops

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda_build": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
        "torchvision": torchvision.__version__,
        "horovod": _horovod(),
        "ray": _ray(),
        "extension": vecops.backend_info(),
    }


def format_text(r: dict[str, Any]) -> str:
    h = r["horovod"]
    if h.get("version"):
        hvd_line = (f"{h['version']} (frameworks: {', '.join(h['frameworks'])}; controllers: "
                    f"{', '.join(h['controllers']) or 'none'}; tensor operations: "
                    f"{', '.join(h['tensor_operations']) or 'none'}; CUDA: {h['cuda_built']})")
    else:
        hvd_line = f"not available ({h.get('error')})"
    cuda = f"CUDA {r['torch_cuda_build']} build" if r["torch_cuda_build"] else "CPU build"
    usable = f"GPU usable: {', '.join(r['cuda_devices'])}" if r["cuda_available"] else "no usable GPU"
    ext = r["extension"]
    lines = [
        f"python       {r['python']}",
        f"torch        {r['torch']} ({cuda}; {usable})",
        f"torchvision  {r['torchvision']}",
        f"horovod      {hvd_line}",
        f"ray          {r['ray'] or 'not installed'}",
        f"extension    backend={ext['backend']} native_built={ext['native_built']} "
        f"native_cuda={ext['native_cuda']}" + (f" ({ext['reason']})" if ext.get("reason") else ""),
    ]
    return "\n".join(lines)
