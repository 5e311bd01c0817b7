"""Backends for the Krylov vector ops: native extension, then torch._foreach_*, then a loop.

A *vector* is a list of tensors shaped like the trainable parameters; a *basis* is a list of such
vectors (orthonormal where an op says so). Every backend offers the same methods:

- ``dot(a, b) -> float``: <a, b>, summed in float64 where the backend can (the native CPU kernels:
  float64 across runs of 16 per-lane products in the input dtype).
- ``multi_dot(basis, v) -> Tensor``: float64 [k] of <B_j, v>, on the CPU.
- ``lincomb_(out, basis, coeffs, beta=1.0) -> float``: out <- beta*out + sum_j coeffs[j] B_j, in
  place; returns ||out||. ``beta=0`` never reads ``out`` (it may hold garbage).
- ``orthonormalize_(v, basis, passes=2) -> (Tensor, float)``: classical Gram-Schmidt ``passes``
  times against an orthonormal basis, then v /= ||v||, in place; returns (B^T v as float64 [k] on
  the CPU, ||v|| before the division). A zero vector is left as it is (norm 0 = breakdown).
- ``flatten(xs) -> Tensor`` and ``unflatten(flat, like) -> list[Tensor]`` (copies).

The in-place ops' output must not share memory with the basis (or with itself): the native
kernels update it while other blocks still read the basis, and reject such input.

``get()`` returns the best available backend (native, else foreach), chosen once and logged once;
``get("native" | "foreach" | "loop")`` forces one, for benchmarks and parity tests.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch

log = logging.getLogger(__name__)

Vector = list[torch.Tensor]

_native: Any = None
_reason: str | None = None
_loaded = False
_default: VectorOps | None = None

BACKENDS = ("native", "foreach", "loop")


def _load_native() -> Any:
    global _native, _reason, _loaded
    if not _loaded:
        _loaded = True
        try:
            from hvd_abs import _C  # noqa: F401 - registers torch.ops.hvd_abs.*

            for name in ("list_dot", "multi_dot", "lincomb_", "orthonormalize_", "flatten", "unflatten"):
                getattr(torch.ops.hvd_abs, name)  # fail here if a registration is missing (stale build)
            _register_fakes()
            _native = _C
        except Exception as exc:  # noqa: BLE001 - a missing or broken build is never fatal
            _native = None
            _reason = f"{type(exc).__name__}: {exc}"
    return _native


def _register_fakes() -> None:
    """Shape-only (fake/meta) kernels, so the ops work under torch.compile and pass opcheck."""
    lib = "hvd_abs::"

    def _f64(like: Sequence[torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        return torch.empty(shape, dtype=torch.float64, device=like[0].device if like else "cpu")

    def _k(basis: Sequence[torch.Tensor], v: Sequence[torch.Tensor]) -> int:
        return len(basis) // len(v) if v else 0

    try:
        torch.library.register_fake(lib + "list_dot")(
            lambda a, b: torch.empty((), dtype=a[0].dtype if a else torch.float64, device=a[0].device if a else "cpu"))
        torch.library.register_fake(lib + "multi_dot")(lambda basis, v: _f64(v, (_k(basis, v),)))
        torch.library.register_fake(lib + "lincomb_")(lambda out, basis, coeffs, beta=1.0: _f64(out, ()))
        torch.library.register_fake(lib + "orthonormalize_")(
            lambda v, basis, passes=2: (_f64(v, (_k(basis, v),)), _f64(v, ())))
        torch.library.register_fake(lib + "flatten")(
            lambda xs: xs[0].new_empty((sum(x.numel() for x in xs),)))
        torch.library.register_fake(lib + "unflatten")(
            lambda flat, like: [flat.new_empty(x.shape) for x in like])
    except RuntimeError as exc:
        # Already registered (a second load in one process): keep the first registration.
        if "already" not in str(exc):
            raise


def _flat_basis(basis: Sequence[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
    return [t for vec in basis for t in vec]


def _coeff_list(coeffs: torch.Tensor | Sequence[float]) -> list[float]:
    if isinstance(coeffs, torch.Tensor):
        return coeffs.detach().to("cpu", torch.float64).tolist()
    return [float(c) for c in coeffs]


class VectorOps:
    """Interface shared by the backends; ``name`` says which one this is."""

    name = "abstract"

    def dot(self, a: Vector, b: Vector) -> float:
        raise NotImplementedError

    def multi_dot(self, basis: Sequence[Vector], v: Vector) -> torch.Tensor:
        raise NotImplementedError

    def lincomb_(self, out: Vector, basis: Sequence[Vector], coeffs: torch.Tensor | Sequence[float],
                 beta: float = 1.0) -> float:
        raise NotImplementedError

    def orthonormalize_(self, v: Vector, basis: Sequence[Vector], passes: int = 2) -> tuple[torch.Tensor, float]:
        raise NotImplementedError

    def flatten(self, xs: Vector) -> torch.Tensor:
        return torch.cat([x.reshape(-1) for x in xs])

    def unflatten(self, flat: torch.Tensor, like: Vector) -> Vector:
        out, off = [], 0
        for x in like:
            out.append(flat[off:off + x.numel()].reshape(x.shape).clone())
            off += x.numel()
        return out

    def __repr__(self) -> str:
        return f"<vecops {self.name}>"


class LoopOps(VectorOps):
    """Reference: one ATen call per tensor and per basis vector (what PyHessian does)."""

    name = "loop"

    def dot(self, a: Vector, b: Vector) -> float:
        return float(sum(torch.sum(x.double() * y.double()).item() for x, y in zip(a, b)))

    def multi_dot(self, basis: Sequence[Vector], v: Vector) -> torch.Tensor:
        return torch.tensor([self.dot(b, v) for b in basis], dtype=torch.float64)

    def lincomb_(self, out: Vector, basis: Sequence[Vector], coeffs: torch.Tensor | Sequence[float],
                 beta: float = 1.0) -> float:
        cs = _coeff_list(coeffs)
        for t, o in enumerate(out):
            if beta == 0.0:
                o.zero_()
            elif beta != 1.0:
                o.mul_(beta)
            for c, b in zip(cs, basis):
                o.add_(b[t], alpha=c)
        return math.sqrt(self.dot(out, out))

    def orthonormalize_(self, v: Vector, basis: Sequence[Vector], passes: int = 2) -> tuple[torch.Tensor, float]:
        _check_passes(passes)
        total = torch.zeros(len(basis), dtype=torch.float64)
        if basis:
            for _ in range(passes):
                h = self.multi_dot(basis, v)
                total += h
                self.lincomb_(v, basis, (-h).tolist())
        norm = math.sqrt(self.dot(v, v))
        if norm > 0.0:
            for x in v:
                x.div_(norm)
        return total, norm


class ForeachOps(VectorOps):
    """torch._foreach_* over the whole list: one multi-tensor call per basis vector."""

    name = "foreach"

    def dot(self, a: Vector, b: Vector) -> float:
        return float(self.multi_dot([a], b)[0])

    def multi_dot(self, basis: Sequence[Vector], v: Vector) -> torch.Tensor:
        k = len(basis)
        if k == 0:
            return torch.zeros(0, dtype=torch.float64)
        # One foreach multiply of all k*T pairs, then one float64 reduction per basis vector.
        prods = torch._foreach_mul(_flat_basis(basis), list(v) * k)
        flat = torch.cat([p.reshape(-1) for p in prods]).view(k, -1)
        return flat.sum(dim=1, dtype=torch.float64).cpu()

    def _norm(self, v: Vector) -> float:
        norms = torch._foreach_norm(v)
        return float(torch.linalg.vector_norm(torch.stack(norms).double()))

    def lincomb_(self, out: Vector, basis: Sequence[Vector], coeffs: torch.Tensor | Sequence[float],
                 beta: float = 1.0) -> float:
        cs = _coeff_list(coeffs)
        if beta == 0.0:
            torch._foreach_zero_(out)
        elif beta != 1.0:
            torch._foreach_mul_(out, beta)
        for c, b in zip(cs, basis):
            torch._foreach_add_(out, b, alpha=c)
        return self._norm(out)

    def orthonormalize_(self, v: Vector, basis: Sequence[Vector], passes: int = 2) -> tuple[torch.Tensor, float]:
        _check_passes(passes)
        total = torch.zeros(len(basis), dtype=torch.float64)
        if basis:
            for _ in range(passes):
                h = self.multi_dot(basis, v)
                total += h
                for c, b in zip((-h).tolist(), basis):
                    torch._foreach_add_(v, b, alpha=c)
        norm = self._norm(v)
        if norm > 0.0:
            torch._foreach_div_(v, norm)
        return total, norm


class NativeOps(VectorOps):
    """The hvd_abs._C operators (CPU always; CUDA when the extension was built with it)."""

    name = "native"

    def __init__(self) -> None:
        if _load_native() is None:
            raise RuntimeError(f"the native extension hvd_abs._C is not available ({_reason}); "
                               "rebuild it with `bash scripts/setup_env.sh` (see .venv/install.log)")
        self._ops = torch.ops.hvd_abs

    def dot(self, a: Vector, b: Vector) -> float:
        if not a:
            return 0.0
        return float(self._ops.multi_dot(list(a), list(b))[0])

    def multi_dot(self, basis: Sequence[Vector], v: Vector) -> torch.Tensor:
        return self._ops.multi_dot(_flat_basis(basis), list(v)).cpu()

    def lincomb_(self, out: Vector, basis: Sequence[Vector], coeffs: torch.Tensor | Sequence[float],
                 beta: float = 1.0) -> float:
        c = coeffs if isinstance(coeffs, torch.Tensor) else torch.tensor(list(coeffs), dtype=torch.float64)
        return float(self._ops.lincomb_(list(out), _flat_basis(basis), c.to(torch.float64), float(beta)))

    def orthonormalize_(self, v: Vector, basis: Sequence[Vector], passes: int = 2) -> tuple[torch.Tensor, float]:
        _check_passes(passes)
        coeffs, norm = self._ops.orthonormalize_(list(v), _flat_basis(basis), passes)
        return coeffs.cpu(), float(norm)

    def flatten(self, xs: Vector) -> torch.Tensor:
        return self._ops.flatten(list(xs))

    def unflatten(self, flat: torch.Tensor, like: Vector) -> Vector:
        return list(self._ops.unflatten(flat, list(like)))


def _check_passes(passes: int) -> None:
    if passes < 1:
        raise ValueError(f"passes must be >= 1 (2 = classical Gram-Schmidt twice), got {passes}")


def get(backend: str | None = None, device: torch.device | str | None = None) -> VectorOps:
    """The vector-op backend: ``None`` (default) = the best available, chosen and logged once;
    ``"native"`` raises if the extension is missing; ``"foreach"`` and ``"loop"`` always work.

    ``device`` (default None = CPU) matters only for ``None``: CUDA vectors with a CPU-only build
    of the extension get the foreach backend instead of failing in the dispatcher."""
    global _default
    if backend is None:
        if device is not None and torch.device(device).type == "cuda":
            native = _load_native()
            if native is not None and native.with_cuda:
                return NativeOps()
            return ForeachOps()
        if _default is None:
            if _load_native() is not None:
                _default = NativeOps()
                log.info("hvd_abs vector ops: native extension (cuda=%s)", _native.with_cuda)
            else:
                _default = ForeachOps()
                log.warning("the C++ extension hvd_abs._C is not built (%s): the second-order vector work runs on "
                            "torch._foreach_* instead (slower). Build it into this environment with `pip install "
                            "--no-build-isolation .` (torch must be importable while it builds)", _reason)
        return _default
    if backend == "native":
        return NativeOps()
    if backend == "foreach":
        return ForeachOps()
    if backend == "loop":
        return LoopOps()
    raise ValueError(f"unknown vector-op backend {backend!r}: use one of {', '.join(BACKENDS)} (or None for the best)")


def backend_info() -> dict[str, Any]:
    """What `hvd-abs env` reports: the chosen backend, whether the extension loaded, its CUDA build,
    and why it did not load (``reason``, None when it did)."""
    native = _load_native()
    return {
        "backend": "native" if native is not None else "foreach",
        "native_built": native is not None,
        "native_cuda": bool(native is not None and native.with_cuda),
        "reason": _reason,
    }
