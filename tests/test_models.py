"""hvd_abs.models: every model builds and runs, parameter counts, the normalisation layer, errors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from hvd_abs.errors import UserError
from hvd_abs.models import Normalize, build_model, count_parameters, list_models

SHAPES = [(1, 8, 8), (3, 32, 32)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", ["mlp", "cnn", "c1", "resnet20"])
def test_builtin_models_forward_and_backward(name: str, shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    model = build_model(name, 7, shape, mean=[0.5] * shape[0], std=[0.25] * shape[0])
    x = torch.rand(4, *shape)
    out = model(x)
    assert out.shape == (4, 7) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    assert model(x[:1]).shape == (1, 7)


def test_paper_parameter_counts() -> None:
    # C1: 4,864 + 102,464 (convs) + 256 (BN) + 1,573,248 + 73,920 + 1,930 (FC 4096-384-192-10).
    assert count_parameters(build_model("c1", 10, (3, 32, 32))) == 1_756_682
    # ResNet-20 with option A shortcuts, as in He et al. (0.27M).
    assert count_parameters(build_model("resnet20", 10, (3, 32, 32))) == 269_722


def test_mlp_has_no_batchnorm() -> None:
    # The accumulation-exactness test relies on per-sample independence.
    model = build_model("mlp", 10, (1, 8, 8))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_normalisation_is_a_fixed_first_op() -> None:
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    torch.manual_seed(0)
    model = build_model("resnet20", 10, (3, 32, 32), mean=mean, std=std).eval()
    assert isinstance(model[0], Normalize) and model.normalize is model[0]
    # Buffers: saved with the model, not trained.
    names = {n for n, _ in model.named_parameters()}
    assert not any(n.startswith("normalize") for n in names)
    assert {"normalize.mean", "normalize.std"} <= set(model.state_dict())
    x = torch.rand(2, 3, 32, 32)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(model(x), model.net((x - m) / s), atol=1e-6)
    # Moves with the model.
    assert model.to(torch.float64).normalize.mean.dtype == torch.float64


def test_without_statistics_the_first_op_is_identity() -> None:
    model = build_model("mlp", 10, (1, 8, 8))
    assert isinstance(model.normalize, nn.Identity)
    assert not any(k.startswith("normalize") for k in model.state_dict())


def test_zero_std_channel_stays_finite() -> None:
    model = build_model("mlp", 3, (1, 8, 8), mean=[0.0], std=[0.0])
    assert torch.isfinite(model(torch.rand(2, 1, 8, 8))).all()


def test_init_is_deterministic_given_the_seed() -> None:
    def weights(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(seed)
        return [p.detach().clone() for p in build_model("c1", 10, (3, 32, 32)).parameters()]

    a, b, c = weights(1), weights(1), weights(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_torchvision_model(shape: tuple[int, int, int]) -> None:
    model = build_model("tv:resnet18", 5, shape, mean=[0.5] * shape[0], std=[0.2] * shape[0])
    assert model(torch.rand(2, *shape)).shape == (2, 5)
    assert 11_000_000 < count_parameters(model) < 11_400_000


def test_list_models() -> None:
    assert list_models() == ["mlp", "cnn", "c1", "resnet20"]
    assert "tv:resnet18" in list_models(include_torchvision=True)


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(UserError) as e:
        build_model("vgg99", 10, (3, 32, 32))
    for name in list_models():
        assert name in str(e.value)
    assert "tv:resnet18" in str(e.value)


def test_unknown_torchvision_model() -> None:
    with pytest.raises(UserError, match="tv:resnet18"):
        build_model("tv:not_a_net", 10, (3, 32, 32))


@pytest.mark.parametrize("kwargs, match", [
    ({"mean": [0.5]}, "both mean and std"),
    ({"mean": [0.5, 0.5], "std": [0.2, 0.2]}, "one value per channel"),
])
def test_bad_statistics(kwargs: dict[str, list[float]], match: str) -> None:
    with pytest.raises(UserError, match=match):
        build_model("mlp", 10, (3, 8, 8), **kwargs)


def test_bad_shapes() -> None:
    with pytest.raises(UserError, match="in_shape"):
        build_model("mlp", 10, (8, 8))  # type: ignore[arg-type]
    with pytest.raises(UserError, match="num_classes"):
        build_model("mlp", 0, (1, 8, 8))
    with pytest.raises(UserError, match="at least 4x4"):
        build_model("c1", 10, (1, 3, 3))
    with pytest.raises(UserError, match="1 or 3 channel"):
        build_model("tv:resnet18", 10, (4, 32, 32))
