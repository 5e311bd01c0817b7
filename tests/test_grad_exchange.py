"""The gradient exchange's order (hvd_abs/training/grad_exchange.py): each gradient is sent as the
last backward pass completes it, not after the pass; earlier passes send nothing. The sums
themselves are checked over real Horovod by the 2-worker equality tests (test_train_distributed,
test_running_stats); this comm records calls and sums nothing."""
from __future__ import annotations

import torch
from torch import nn

from hvd_abs.training.grad_exchange import GradientExchange


class RecordingComm:
    size = 2

    def __init__(self) -> None:
        self.sent: list[str] = []

    def allreduce_sum_async_(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        self.sent.append(name)
        return tensor

    def grouped_sum_async(self, tensors: list[torch.Tensor], name: str) -> list[torch.Tensor]:
        self.sent.append(name)
        return tensors

    def wait(self, handle):  # noqa: ANN001
        return handle


def test_gradients_are_sent_during_the_last_pass_from_the_last_layer_back():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    unused = nn.Parameter(torch.ones(3))
    params = [*model.parameters(), unused]
    comm = RecordingComm()
    exchange = GradientExchange(params, comm)
    assert GradientExchange.supported(comm) and not GradientExchange.supported(object())
    seen_at_first_layer: list[int] = []
    model[0].weight.register_hook(lambda g: seen_at_first_layer.append(len(comm.sent)))
    x = torch.randn(5, 4)
    with exchange.sending(False):
        model(x).sum().backward()  # an earlier micro-batch: accumulates only
    assert comm.sent == []
    stats = exchange.start([torch.zeros(3)])
    with exchange.sending(True):
        model(x).sum().backward()
    # The last layer's gradients went out before the first layer's was computed (overlap).
    assert comm.sent[0] == "hvd_abs.stats.1" and seen_at_first_layer[-1] >= 3
    assert comm.sent[1:3] == ["hvd_abs.grad.5", "hvd_abs.grad.4"]  # Linear 3's bias and weight
    exchange.wait(stats)
    assert sorted(comm.sent[1:]) == sorted(f"hvd_abs.grad.{i}" for i in range(7))
    assert torch.equal(unused.grad, torch.zeros(3))  # every rank takes part, with zeros
    with exchange.sending(False):
        model(x).sum().backward()  # the next update's first pass: nothing sent again
    assert len(comm.sent) == 8
