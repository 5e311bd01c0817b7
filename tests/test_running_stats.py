"""BatchNorm running statistics on W ranks equal the 1-process ones (hvd_abs/running_stats.py),
checked in one process with the ranks' payloads summed by hand; tests/test_train_distributed.py
checks it with 2 real workers through the eval-mode test loss and eigenvalue."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hvd_abs.running_stats import RunningStats


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 16),
                         nn.BatchNorm1d(16, momentum=0.3), nn.Linear(16, 4),
                         nn.BatchNorm1d(4, momentum=None))  # (a cumulative average: left alone)


def _alone(s: RunningStats, model: nn.Module, batches: list[torch.Tensor]) -> None:
    """One update of a rank that runs every micro-batch, its payload the sum."""
    s.begin(len(batches))
    for j, x in enumerate(batches):
        s.before(j)
        with torch.no_grad():
            model(x)
        s.after()
    s.finish(s.payload())


@pytest.mark.parametrize("world", [2, 3])
def test_the_ranks_end_each_update_with_the_one_process_statistics(world: int) -> None:
    batches = [torch.randn(6, 3, 8, 8) * (j + 1) + j for j in range(5)]  # K = 5 micro-batches
    one = _net().train()
    ranks = [copy.deepcopy(one) for _ in range(world)]
    stats = [RunningStats(m) for m in ranks]
    for update in range(2):
        with torch.no_grad():
            for x in batches:  # one process: every micro-batch in order
                one(x)
        for r, (model, s) in enumerate(zip(ranks, stats)):
            s.begin(len(batches))
            for j in range(r, len(batches), world):  # rank r's micro-batches (round robin)
                s.before(j)
                with torch.no_grad():
                    model.eval()(batches[j][:2])  # an FGSM forward in eval mode between: no statistics
                    model.train()(batches[j])
                s.after()
        total = sum(s.payload() for s in stats)
        for s in stats:
            s.finish(total)
        for model in ranks:
            for (name, a), b in zip(one.named_buffers(), model.buffers()):
                if name.startswith("7."):  # momentum None: each rank its own
                    continue
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    assert len(stats[0].layers) == 2


def test_momentum_zero_layers_are_left_alone_and_odd_forwards_are_warned_about(caplog) -> None:
    twice = nn.BatchNorm2d(3)

    class Twice(nn.Module):  # one layer used twice per forward
        def __init__(self) -> None:
            super().__init__()
            self.bn = twice

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.bn(x))

    frozen = nn.Sequential(nn.BatchNorm2d(3, momentum=0.0), Twice()).train()
    s = RunningStats(frozen)
    assert s.layers == [twice]  # (momentum 0: its statistics never change; it divided by 0)
    with caplog.at_level("WARNING"):
        _alone(s, frozen, [torch.randn(4, 3, 5, 5) for _ in range(2)])
    assert "other than once per micro-batch" in caplog.text and twice.num_batches_tracked.item() == 4


def test_a_layer_in_eval_mode_keeps_its_statistics_and_plain_models_have_none() -> None:
    model = _net().train()
    model[1].eval()  # a frozen BatchNorm
    before = model[1].running_mean.clone()
    _alone(RunningStats(model), model, [torch.randn(6, 3, 8, 8) for _ in range(3)])
    torch.testing.assert_close(model[1].running_mean, before)
    assert RunningStats(nn.Sequential(nn.Linear(3, 2))).layers == []
