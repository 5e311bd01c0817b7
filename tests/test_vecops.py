"""Parity of the Krylov vector-op backends (native vs torch._foreach_* vs the reference loop) and
torch.library.opcheck of every native op.

The native extension is always built in this project's environment, so native tests FAIL when
it is missing (they do not skip). Only the CUDA variants depend on hardware: they run when
torch.cuda.is_available(), and are otherwise skipped with the reason "no CUDA device" (shown by
`pytest -rs`).
"""
from __future__ import annotations

import pytest
import torch

from hvd_abs.second_order import vecops

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device: CUDA parity not run"))]
DTYPES = [torch.float32, torch.float64]
# Shapes like a small conv net's parameters, including a scalar-ish one and an odd size.
SHAPES = [(16, 3, 3, 3), (16,), (16,), (32, 16, 3, 3), (7,), (10, 32), (1,), (3, 5, 2049)]
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}


def _vec(gen: torch.Generator, dtype: torch.dtype, device: str) -> list[torch.Tensor]:
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).to(device) for s in SHAPES]


def _basis(k: int, dtype: torch.dtype, device: str, seed: int = 0) -> list[list[torch.Tensor]]:
    """k orthonormal vectors (QR in float64, then cast)."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [torch.Size(s).numel() for s in SHAPES]
    q, _ = torch.linalg.qr(torch.randn(sum(sizes), k, generator=gen, dtype=torch.float64))
    return [[c.reshape(s).to(dtype).to(device).contiguous() for c, s in zip(q[:, j].split(sizes), SHAPES)]
            for j in range(k)]


def _clone(v: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.clone() for t in v]


def _close(a: list[torch.Tensor], b: list[torch.Tensor], dtype: torch.dtype) -> None:
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **TOL[dtype])


def test_native_extension_is_built() -> None:
    info = vecops.backend_info()
    assert info["native_built"], f"hvd_abs._C did not load: {info['reason']}; run scripts/setup_env.sh"
    assert info["backend"] == "native"
    assert vecops.get().name == "native"


def test_unknown_backend_names_the_choices() -> None:
    with pytest.raises(ValueError, match="native, foreach, loop"):
        vecops.get("cupy")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend,k", [("native", 6), ("native", 13), ("foreach", 6)])
def test_parity_with_reference_loop(backend: str, k: int, dtype: torch.dtype, device: str) -> None:
    # k = 13: the native CPU kernels take basis vectors 8, 4 and 1 at a time (dots 4 and 1)
    ops, ref = vecops.get(backend), vecops.get("loop")
    gen = torch.Generator().manual_seed(1)
    basis = _basis(k, dtype, device)
    v, w = _vec(gen, dtype, device), _vec(gen, dtype, device)

    assert ops.dot(v, w) == pytest.approx(ref.dot(v, w), rel=1e-5 if dtype == torch.float32 else 1e-12)
    torch.testing.assert_close(ops.multi_dot(basis, v), ref.multi_dot(basis, v), rtol=1e-5, atol=1e-5)

    coeffs = torch.randn(k, generator=gen, dtype=torch.float64)
    for beta in (0.0, 1.0, -0.5):
        a, b = _clone(v), _clone(v)
        if beta == 0.0:  # beta = 0 must not read `out`: NaN there must not leak through
            for t in a:
                t.fill_(float("nan"))
        na, nb = ops.lincomb_(a, basis, coeffs, beta=beta), ref.lincomb_(b, basis, coeffs, beta=beta)
        _close(a, b, dtype)
        assert na == pytest.approx(nb, rel=1e-5)

    for passes in (1, 2):
        a, b = _clone(v), _clone(v)
        ca, na = ops.orthonormalize_(a, basis, passes=passes)
        cb, nb = ref.orthonormalize_(b, basis, passes=passes)
        _close(a, b, dtype)
        torch.testing.assert_close(ca, cb, rtol=1e-5, atol=1e-5)
        assert na == pytest.approx(nb, rel=1e-5)
        # the result is a unit vector orthogonal to the basis
        assert ref.dot(a, a) == pytest.approx(1.0, rel=1e-5)
        assert ref.multi_dot(basis, a).abs().max() < (1e-6 if dtype == torch.float32 else 1e-13)

    # empty basis: plain normalisation
    a = _clone(v)
    c, n = ops.orthonormalize_(a, [])
    assert c.numel() == 0 and n == pytest.approx(ref.dot(v, v) ** 0.5, rel=1e-6)

    flat = ops.flatten(v)
    torch.testing.assert_close(flat, ref.flatten(v), rtol=0, atol=0)
    _close(ops.unflatten(flat, v), v, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_native_cpu_results_do_not_depend_on_the_thread_count(dtype: torch.dtype) -> None:
    # Large enough for the pass to be split across threads; partial sums are per block, added
    # in block order, so any thread count must agree bit for bit (16: the GPU machine's cores).
    ops = vecops.get("native")
    gen = torch.Generator().manual_seed(5)
    shapes = [(300_001,), (5, 7), (40_000,)]
    basis = [[torch.randn(s, generator=gen, dtype=dtype) for s in shapes] for _ in range(9)]
    v = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 16):
            torch.set_num_threads(threads)
            a = _clone(v)
            coef, norm = ops.orthonormalize_(a, basis)
            results.append((a, coef, norm, ops.multi_dot(basis, v)))
    finally:
        torch.set_num_threads(before)
    (a1, c1, n1, d1) = results[0]
    for a2, c2, n2, d2 in results[1:]:
        assert n1 == n2 and torch.equal(c1, c2) and torch.equal(d1, d2)
        assert all(torch.equal(x, y) for x, y in zip(a1, a2))


@pytest.mark.parametrize("device", DEVICES)
def test_zero_vector_is_left_alone(device: str) -> None:
    ops = vecops.get("native")
    v = [torch.zeros(s, device=device) for s in SHAPES]
    _, n = ops.orthonormalize_(v, _basis(2, torch.float32, device))
    assert n == 0.0 and all(bool((t == 0).all()) for t in v)


def test_native_rejects_bad_input_with_a_fix() -> None:
    vecops.get("native")  # loads the extension (run alone, no other test has)
    ops = torch.ops.hvd_abs
    v = [torch.randn(3), torch.randn(4)]
    with pytest.raises(RuntimeError, match="whole vectors"):
        ops.multi_dot([torch.randn(3)], v)
    with pytest.raises(RuntimeError, match="float32 and float64"):
        ops.multi_dot([t.half() for t in v], [t.half() for t in v])
    with pytest.raises(RuntimeError, match="coeffs must be 1-D"):
        ops.lincomb_(v, [t.clone() for t in v], torch.zeros(2, dtype=torch.float64), 1.0)
    with pytest.raises(RuntimeError, match="not contiguous"):
        ops.orthonormalize_([torch.randn(4, 3).t(), torch.randn(4)], [], 2)
    # The output is updated in place while the basis is read: they must not share memory.
    with pytest.raises(RuntimeError, match="shares memory with a basis tensor"):
        ops.lincomb_(v, [v[0], torch.randn(4)], torch.ones(1, dtype=torch.float64), 1.0)
    x = torch.randn(20)
    with pytest.raises(RuntimeError, match="shares memory with a basis tensor"):
        ops.orthonormalize_([x[:8]], [x[6:14]], 2)
    with pytest.raises(RuntimeError, match="shares memory with another tensor"):
        ops.orthonormalize_([x[:8], x[4:12]], [], 2)
    # Basis tensors may share memory with each other (they are only read).
    ops.lincomb_([torch.zeros(8)], [x[:8], x[2:10]], torch.ones(2, dtype=torch.float64), 1.0)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_every_native_op(device: str) -> None:
    vecops.get("native")  # loads the extension and registers the fake kernels
    ops = torch.ops.hvd_abs
    basis = [t for b in _basis(3, torch.float32, device) for t in b]
    gen = torch.Generator().manual_seed(3)
    v = _vec(gen, torch.float32, device)
    coeffs = torch.randn(3, dtype=torch.float64, device=device)
    cases = [
        (ops.list_dot.default, (v, _clone(v))),
        (ops.multi_dot.default, (basis, v)),
        (ops.lincomb_.default, (_clone(v), basis, coeffs, 0.5)),
        (ops.orthonormalize_.default, (_clone(v), basis, 2)),
        (ops.flatten.default, (v,)),
        (ops.unflatten.default, (torch.randn(sum(t.numel() for t in v), device=device), v)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)
