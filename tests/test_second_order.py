"""Correctness of hvd_abs.second_order against dense Hessians of small float64 models."""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.func import functional_call

from hvd_abs.second_order import HessianOperator, hessian_density, hessian_trace, hvp, top_eigenvalues
from hvd_abs.second_order.hvp import METHODS, _shard

CRIT = nn.CrossEntropyLoss()


class TinyConv(nn.Module):
    """A few hundred parameters, with BatchNorm2d (eval statistics made non-trivial)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.bn(self.conv(x))).flatten(1))


class TwoConv(nn.Module):
    """Two convolutions (the second strided, grouped, on an input that depends on the parameters:
    every term of a convolution's second derivative), BatchNorm2d, about 200 parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=2, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 2 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.bn(self.conv2(torch.tanh(self.conv1(x))))).flatten(1))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 4))


def _mlp_bn() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.Tanh(), nn.Linear(12, 4))


def _setup(kind: str) -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if kind in ("conv_bn", "two_conv"):
        model = (TinyConv() if kind == "conv_bn" else TwoConv()).double()
        x, ncls = torch.randn(23, 2, 4, 4, generator=gen, dtype=torch.float64), 3
    else:
        model = (_mlp_bn() if kind == "mlp_bn" else _mlp()).double()
        x, ncls = torch.randn(23, 6, generator=gen, dtype=torch.float64), 4
    y = torch.randint(0, ncls, (23,), generator=gen)
    model.train()
    with torch.no_grad():
        model(x)  # BatchNorm running statistics away from (0, 1)
    # uneven batches: 7 + 11 + 5 samples
    return model, [(x[:7], y[:7]), (x[7:18], y[7:18]), (x[18:], y[18:])]


def _dense_hessian(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Dense Hessian of the mean loss over all samples w.r.t. the trainable parameters, in eval mode."""
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for _, p in named]
    sizes = [p.numel() for _, p in named]
    consts = dict(model.named_buffers())
    consts.update({n: p.detach() for n, p in model.named_parameters() if not p.requires_grad})
    was = model.training
    model.eval()

    def f(flat: torch.Tensor) -> torch.Tensor:
        state = dict(consts)
        state.update({n: c.reshape(s) for (n, _), c, s in zip(named, flat.split(sizes), shapes)})
        return CRIT(functional_call(model, state, (x,)), y)

    flat = torch.cat([p.detach().reshape(-1) for _, p in named])
    h = torch.autograd.functional.hessian(f, flat)
    model.train(was)
    return h


def _flat(v: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in v])


@pytest.fixture(scope="module", params=["mlp", "mlp_bn", "conv_bn", "two_conv"])
def problem(request: pytest.FixtureRequest) -> tuple[nn.Module, list, torch.Tensor]:
    model, batches = _setup(request.param)
    return model, batches, _dense_hessian(model, batches)


@pytest.mark.parametrize("method", METHODS)
def test_hvp_matches_dense_hessian(problem: tuple, method: str) -> None:
    model, batches, dense = problem
    gen = torch.Generator().manual_seed(1)
    params = [p for p in model.parameters() if p.requires_grad]
    vs = [[torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params] for _ in range(2)]
    out = hvp(model, CRIT, batches, vs, method=method)  # a list of vectors -> a list of products
    assert len(out) == 2
    for v, hv in zip(vs, out):
        ref = dense @ _flat(v)
        assert [t.shape for t in hv] == [p.shape for p in params]
        assert float((_flat(hv) - ref).norm() / ref.norm()) < 1e-6
    one = hvp(model, CRIT, batches, vs[0], method=method)  # a single vector -> one product
    assert [t.shape for t in one] == [p.shape for p in params]
    assert float((_flat(one) - _flat(out[0])).norm()) <= 1e-12 * float(_flat(out[0]).norm())


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_top3_matches_eigvalsh_with_negative_eigenvalues(problem: tuple, method: str) -> None:
    model, batches, dense = problem
    ev = torch.linalg.eigvalsh(dense).flip(0)
    assert ev[-1] < 0, "the test needs negative eigenvalues in the spectrum"
    # Power iteration converges to the largest |eigenvalue|: this set-up keeps the top-3 positive
    # ones ahead of the negative ones in magnitude (documented limitation of the reference method).
    assert ev[2] > abs(ev[-1])
    kwargs = dict(tol=1e-6, max_iter=300) if method == "lanczos" else dict(tol=1e-10, max_iter=3000)
    res = top_eigenvalues(model, CRIT, batches, k=3, method=method, **kwargs)
    assert len(res.eigenvalues) == len(res.eigenvectors) == len(res.converged) == 3
    assert res.eigenvalues == sorted(res.eigenvalues, reverse=True)
    assert all(res.converged)
    for got, want in zip(res.eigenvalues, ev[:3].tolist()):
        assert abs(got - want) <= 1e-4 * abs(want)
    # eigenvectors: unit, and H y = theta y
    for lam, y in zip(res.eigenvalues, res.eigenvectors):
        fy = _flat(y)
        assert float(fy.norm()) == pytest.approx(1.0, rel=1e-6)
        assert float((dense @ fy - lam * fy).norm()) < 1e-2 * abs(lam)
    if method == "lanczos":
        assert res.num_hvps < dense.shape[0]


def test_lanczos_restarts_and_finds_the_algebraic_top(problem: tuple) -> None:
    """A tiny basis forces thick restarts; the answer must not change."""
    model, batches, dense = problem
    ev = torch.linalg.eigvalsh(dense).flip(0)
    res = top_eigenvalues(model, CRIT, batches, k=2, tol=1e-6, max_iter=2000, max_basis=8, backend="foreach")
    assert len(res.eigenvalues) == len(res.converged) == 2 and all(res.converged)
    for got, want in zip(res.eigenvalues, ev[:2].tolist()):
        assert abs(got - want) <= 1e-4 * abs(want)


def test_density_quadrature_is_exact_for_low_degree_moments(problem: tuple) -> None:
    """Stochastic Lanczos quadrature: each probe's weights sum to 1 and reproduce v'H^j v for
    j < 2 x steps; with steps = n the nodes are H's eigenvalues; averaged over probes the
    first moment is trace / n."""
    model, batches, dense = problem
    steps = 6
    res = hessian_density(model, CRIT, batches, steps=steps, probes=3, seed=5)
    assert len(res.nodes) == 3 and res.num_hvps == 3 * steps
    gen = torch.Generator().manual_seed(5)  # (the probes are the operator's gaussian draws, in order)
    op = HessianOperator(model, CRIT, batches)
    for nodes, weights in zip(res.nodes, res.weights):
        v = _flat(op.random(gen))
        v = v / v.norm()
        assert sum(weights) == pytest.approx(1.0, abs=1e-10)
        t, w = torch.tensor(nodes, dtype=torch.float64), torch.tensor(weights, dtype=torch.float64)
        for j in (1, 2, 5, 2 * steps - 1):
            want = float(v @ torch.linalg.matrix_power(dense, j) @ v)
            assert float((w * t ** j).sum()) == pytest.approx(want, rel=1e-6, abs=1e-9 * float(dense.norm()) ** j)
    grid, density = res.curve(points=4000)
    assert sum(d * (grid[1] - grid[0]) for d in density) == pytest.approx(1.0, rel=1e-3)


def test_density_run_to_the_end_has_the_eigenvalues_as_nodes() -> None:
    """The Krylov space closes after as many steps as v sees distinct eigenvalues (repeated ones,
    the many zeros among them, count once): every node is one of H's eigenvalues, both ends too."""
    model, batches = _setup("mlp_bn")
    dense = _dense_hessian(model, batches)
    n = dense.shape[0]
    full = hessian_density(model, CRIT, batches, steps=n, probes=1, seed=1)
    ev = torch.linalg.eigvalsh(dense)
    nodes = torch.tensor(full.nodes[0], dtype=torch.float64)
    scale = float(ev.abs().max())
    assert float((nodes[:, None] - ev[None, :]).abs().min(dim=1).values.max()) <= 1e-6 * scale
    assert float(nodes.max()) == pytest.approx(float(ev.max()), rel=1e-8)
    assert float(nodes.min()) == pytest.approx(float(ev.min()), rel=1e-8, abs=1e-8 * scale)


def test_trace_within_three_standard_errors(problem: tuple) -> None:
    model, batches, dense = problem
    res = hessian_trace(model, CRIT, batches, tol=1e-3, max_iter=150, seed=3)
    assert res.num_hvps == 150 and not res.converged
    assert abs(res.value - float(dense.trace())) <= 3 * res.stderr
    # ... and the standard error is the one the probes give, not one inflated to pass the line above:
    # a Rademacher probe's v'Hv has variance 2 (||H||_F^2 - sum_i H_ii^2).
    expected = (2 * (float((dense ** 2).sum()) - float((dense.diagonal() ** 2).sum())) / 150) ** 0.5
    assert 0.5 * expected <= res.stderr <= 1.5 * expected


def test_unused_and_frozen_parameters() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.frozen = nn.Linear(5, 8)
            self.head = nn.Linear(8, 3)
            self.unused = nn.Linear(4, 4)  # never called in forward

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.frozen(x)))

    torch.manual_seed(0)
    model = Net().double()
    model.frozen.requires_grad_(False)
    x, y = torch.randn(10, 5, dtype=torch.float64), torch.randint(0, 3, (10,))
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 4  # head.{weight,bias}, unused.{weight,bias}
    dense = _dense_hessian(model, batches)
    v = [torch.randn_like(p) for p in trainable]
    for method in METHODS:
        hv = hvp(model, CRIT, batches, v, method=method)
        assert len(hv) == 4
        assert float(hv[2].abs().max()) == 0.0 and float(hv[3].abs().max()) == 0.0
        ref = dense @ _flat(v)
        assert float((_flat(hv) - ref).norm() / ref.norm()) < 1e-6
    res = top_eigenvalues(model, CRIT, batches, k=2, tol=1e-6)
    assert res.eigenvalues[0] == pytest.approx(float(torch.linalg.eigvalsh(dense)[-1]), rel=1e-4)


def test_model_state_restored_exactly() -> None:
    model, batches = _setup("conv_bn")
    model.train()
    model.bn.eval()  # mixed modes must come back as they were
    for p in model.parameters():
        p.grad = None
    model.fc.weight.grad = torch.full_like(model.fc.weight, 0.25)
    grad_obj = model.fc.weight.grad
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    modes = {n: m.training for n, m in model.named_modules()}
    v = [torch.randn_like(p) for p in model.parameters()]
    for method in METHODS:
        hvp(model, CRIT, batches, v, method=method)
    top_eigenvalues(model, CRIT, batches, k=2, max_iter=20)
    top_eigenvalues(model, CRIT, batches, k=1, max_iter=5, method="power")
    hessian_trace(model, CRIT, batches, max_iter=3)
    assert {n: m.training for n, m in model.named_modules()} == modes
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n])
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n
    assert model.fc.weight.grad is grad_obj and bool((grad_obj == 0.25).all())
    assert model.conv.weight.grad is None
    assert not any("forward" in m.__dict__ for m in model.modules())  # layer_grads' switch undone


def test_restored_even_when_the_model_raises() -> None:
    model, batches = _setup("mlp_bn")
    model.train()

    def bad(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        top_eigenvalues(model, bad, batches)
    assert model.training and model[1].training
    conv, conv_batches = _setup("two_conv")
    with pytest.raises(RuntimeError, match="boom"):
        hvp(conv, bad, conv_batches, [torch.zeros_like(p) for p in conv.parameters()])
    assert not any("forward" in m.__dict__ for m in conv.modules())


@pytest.mark.parametrize("backend", ["native", "foreach"])  # each against the loop
def test_solver_backends_agree(backend: str) -> None:
    model, batches = _setup("mlp")
    ref = top_eigenvalues(model, CRIT, batches, k=2, tol=1e-8, max_iter=200, backend="loop")
    res = top_eigenvalues(model, CRIT, batches, k=2, tol=1e-8, max_iter=200, backend=backend)
    assert res.eigenvalues == pytest.approx(ref.eigenvalues, rel=1e-8)


def test_float32_model_and_operator_reuse() -> None:
    model, batches = _setup("mlp")
    model = model.float()
    fb = [(x.float(), y) for x, y in batches]
    dense = _dense_hessian(model.double(), batches)
    model.float()
    with HessianOperator(model, CRIT, fb) as H:
        v = H.random(torch.Generator().manual_seed(0))
        a, b = H(v), H(v)  # the kept graph serves several products
        assert H.num_products == 2
    ref = dense @ _flat(v).double()
    assert float((_flat(a).double() - ref).norm() / ref.norm()) < 1e-4
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_shards_cover_every_sample_once() -> None:
    for n in (1, 2, 7, 128):
        for size in (1, 2, 3, 5):
            parts = [_shard(n, r, size) for r in range(size)]
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))


@pytest.mark.parametrize("call,match", [
    (lambda m, b: hvp(m, CRIT, b, [], method="exact"), "use one of reuse"),
    (lambda m, b: top_eigenvalues(m, CRIT, b, k=0), "k must be >= 1"),
    (lambda m, b: top_eigenvalues(m, CRIT, b, method="arnoldi"), "lanczos, power"),
    (lambda m, b: top_eigenvalues(m, CRIT, [], k=1), "no samples"),
    (lambda m, b: hessian_trace(m, CRIT, b, tol=0), "tol must be > 0"),
    (lambda m, b: hvp(m, CRIT, b, [torch.zeros(1)]), "trainable"),
])
def test_bad_input_names_the_fix(call: Callable, match: str) -> None:
    model, batches = _setup("mlp")
    with pytest.raises(ValueError, match=match):
        call(model, batches)


def test_import_does_not_pull_in_horovod() -> None:
    import subprocess
    import sys

    code = ("import sys, hvd_abs.second_order as so; so.top_eigenvalues; "
            "assert not any(m.startswith('horovod') for m in sys.modules), 'horovod imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_operators_of_different_methods_nest() -> None:
    """A reuse operator (layers switched to layer_grads) open while torch.func's forward-over-
    reverse runs on the same model: the switched layers stand aside under torch.func."""
    model, batches = _setup("two_conv")
    gen = torch.Generator().manual_seed(3)
    v = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in model.parameters()]
    ref = _flat(hvp(model, CRIT, batches, v, method="double_backward"))
    with HessianOperator(model, CRIT, batches, method="reuse") as H:
        inner = _flat(hvp(model, CRIT, batches, v, method="forward_over_reverse"))
        outer = _flat(H(v))
    for got in (inner, outer):
        assert float((got - ref).norm() / ref.norm()) < 1e-10


def test_hessian_command_says_when_the_trace_did_not_converge() -> None:
    import json

    from click.testing import CliRunner

    from hvd_abs.cli import main

    args = ["hessian", "--dataset", "digits", "--model", "mlp", "--samples", "64", "--top-k", "2", "--trace",
            "--max-iter", "3"]  # 3 probes cannot reach a 1e-3 relative standard error
    report = json.loads(CliRunner().invoke(main, [*args, "--json"]).output)
    assert report["trace"]["converged"] is False and report["trace"]["num_hvps"] == 3
    text = CliRunner().invoke(main, args).output
    trace_line = next(line for line in text.splitlines() if line.startswith("trace:"))
    assert "not converged" in trace_line and "--max-iter 3" in trace_line, text


def test_hessian_command_takes_a_finished_run(tmp_path) -> None:
    """--run DIR: the model as trained (its model.pt), on the run's data set, unless given."""
    import json

    from click.testing import CliRunner

    from hvd_abs.cli import main

    run = tmp_path / "run"
    assert CliRunner().invoke(main, ["train", "--method", "sgd", "--epochs", "1", "--quiet", "--out", str(run)]
                              ).exit_code == 0  # digits, model cnn (auto)
    args = ["hessian", "--samples", "64", "--top-k", "1", "--json"]
    report = json.loads(CliRunner().invoke(main, [*args, "--run", str(run)]).output)
    same = json.loads(CliRunner().invoke(main, [*args, "--dataset", "digits", "--model", "cnn", "--checkpoint",
                                                str(run / "model.pt")]).output)
    assert (report["model"], report["dataset"], report["checkpoint"]) == ("cnn", "digits", str(run / "model.pt"))
    assert report["eigenvalues"] == same["eigenvalues"]
    untrained = json.loads(CliRunner().invoke(main, [*args, "--dataset", "digits", "--model", "cnn"]).output)
    assert untrained["eigenvalues"] != report["eigenvalues"]
    (run / "model.pt").unlink()
    result = CliRunner().invoke(main, [*args, "--run", str(run)])
    assert result.exit_code == 2 and "has no model.pt (the run has not finished)" in result.output


def test_the_hessian_command_draws_the_density(tmp_path) -> None:
    """`hvd-abs hessian --density PLOT`: the quadrature in the JSON, the plot written; a plot path
    that cannot be written is refused before any product is spent."""
    import json

    from click.testing import CliRunner

    from hvd_abs.cli import main

    plot = tmp_path / "density.png"
    args = ["hessian", "--model", "mlp", "--dataset", "digits", "--samples", "128", "--top-k", "1",
            "--density-steps", "12", "--density-probes", "2", "--json"]
    result = CliRunner().invoke(main, [*args, "--density", str(plot)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    density = report["density"]
    assert len(density["nodes"]) == 2 and all(len(n) == 12 for n in density["nodes"])
    assert all(sum(w) == pytest.approx(1.0) for w in density["weights"])
    assert max(max(n) for n in density["nodes"]) == pytest.approx(report["eigenvalues"][0], rel=1e-3)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and density["plot"] == str(plot)
    for where in (str(tmp_path), str(tmp_path / "d.txt")):  # a folder; not an image format
        bad = CliRunner().invoke(main, [*args, "--density", where])
        assert bad.exit_code == 2 and "--density" in bad.output and len(bad.output.strip().splitlines()) == 1
    deeper = tmp_path / "new" / "folder" / "d.png"  # (made)
    assert CliRunner().invoke(main, [*args, "--density", str(deeper)]).exit_code == 0 and deeper.is_file()
