"""FGSM and the ABSA adversarial schedule."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from hvd_abs.adversarial import AdversarialSchedule, fgsm


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 8 * 8, 10))


def _batch(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_fgsm_stays_within_eps_and_pixel_range_and_raises_loss() -> None:
    model, (x, y) = _model(), _batch()
    model.eval()
    crit = nn.CrossEntropyLoss()
    x_adv = fgsm(model, crit, x, y, eps=0.05)
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert (x_adv - x).abs().max() <= 0.05 + 1e-7
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        assert crit(model(x_adv), y) > crit(model(x), y)


def test_fgsm_restores_mode_and_leaves_grads_and_bn_stats_untouched() -> None:
    model, (x, y) = _model(), _batch()
    model.train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    bn_before = model[1].running_mean.clone()
    fgsm(model, nn.CrossEntropyLoss(), x, y, eps=0.005)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(p.grad, torch.full_like(p, 3.0)) for p in model.parameters())
    assert torch.equal(model[1].running_mean, bn_before)  # made in eval(): no BN update
    model.eval()
    fgsm(model, nn.CrossEntropyLoss(), x, y, eps=0.005)
    assert not model.training


def test_schedule_replaces_the_first_samples_of_each_micro_batch() -> None:
    model, (x, y) = _model(), _batch(128)
    sched = AdversarialSchedule(0.2, 0.005, total_epochs=10)
    x_mixed, n = sched.apply(model, nn.CrossEntropyLoss(), x, y, epoch=0)
    assert n == 26 == round(0.2 * 128)
    assert not torch.equal(x_mixed[:n], x[:n]) and torch.equal(x_mixed[n:], x[n:])


def test_schedule_halves_on_growth_and_stops_at_cap_and_half_run() -> None:
    s = AdversarialSchedule(0.2, 0.005, total_epochs=10)
    assert s.ratio(0) == 0.2 and s.num_adversarial(0, 128) == 26
    s.on_growth(at_max=False)
    assert s.ratio(1) == pytest.approx(0.1) and s.num_adversarial(1, 128) == 13
    assert s.ratio(4) == pytest.approx(0.1) and s.ratio(5) == 0.0  # off from E/2 on
    s2 = AdversarialSchedule()
    s2.load_state_dict(s.state_dict())
    assert s2.state_dict() == s.state_dict() and s2.ratio(1) == s.ratio(1)
    s.on_growth(at_max=True)
    assert s.ratio(0) == 0.0


def test_absa_starting_at_the_max_batch_makes_no_adversarial_samples(tmp_path) -> None:
    # Off at the max batch also when the run starts there, not only after a growth reaches it.
    from hvd_abs.training import TrainConfig, train

    cfg = TrainConfig(method="absa", model="mlp", epochs=2, base_batch=32, batch=64, max_batch=64,
                      out=str(tmp_path), quiet=True)
    train(cfg, plot=False)
    from hvd_abs.metrics import read_metrics

    epochs, _ = read_metrics(tmp_path)
    assert [e["adv_ratio"] for e in epochs] == [0.0, 0.0]


@pytest.mark.parametrize("kwargs", [{"ratio": -0.1}, {"ratio": 1.5}, {"eps": -1.0}])
def test_schedule_rejects_bad_values(kwargs) -> None:
    from hvd_abs.errors import UserError

    with pytest.raises(UserError):
        AdversarialSchedule(**kwargs)
