"""--precision (hvd_abs/precision.py): bf16 forward passes under autocast, everything else float32."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from hvd_abs.errors import UserError
from hvd_abs.training import TrainConfig, Trainer


@pytest.fixture(scope="module")
def digits():
    from hvd_abs.data import load_dataset

    return load_dataset("digits")


def test_bf16_precision_runs_the_forward_passes_under_autocast_and_the_rest_in_float32(digits, tmp_path: Path) -> None:
    """--precision bf16: two updates (3 accumulated micro-batches, FGSM included) equal torch's own
    autocast loop; the test pass is autocast too; the weights stay float32 and the growth check's
    Hessian sees the float32 model (the same eigenvalue as at fp32 for the same weights)."""
    import torch.nn.functional as F

    from hvd_abs.adversarial import fgsm

    common = dict(method="absa", model="mlp", epochs=4, batch=96, base_batch=32, lr=0.3, eig_samples=64,
                  quiet=True)
    trainer = Trainer(TrainConfig(**common, precision="bf16", out=str(tmp_path / "b")), data=digits)
    model = copy.deepcopy(trainer.model)
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)

    def fwd(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x).float()

    class Fwd(torch.nn.Module):  # fgsm takes a module (it switches it to eval mode and back)
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return fwd(x)

    perm = trainer.sampler.permutation()
    n_adv = trainer.adv.num_adversarial(0, 32)
    assert n_adv > 0
    for step in range(2):
        opt.zero_grad()
        for k in range(3):  # the micro-batches, each with its FGSM share first
            idx = perm[step * 96 + 32 * k:step * 96 + 32 * (k + 1)]
            x, y = digits.train_x[idx], digits.train_y[idx]
            x = torch.cat([fgsm(Fwd(), F.cross_entropy, x[:n_adv], y[:n_adv], trainer.adv.eps), x[n_adv:]])
            (F.cross_entropy(fwd(x), y, reduction="sum") / 96).backward()
        opt.step()
        assert trainer.step()
    for a, b in zip(trainer.model.parameters(), model.parameters()):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    model.eval()
    with torch.no_grad():
        logits = fwd(digits.test_x)
    want = (F.cross_entropy(logits, digits.test_y).item(), (logits.argmax(1) == digits.test_y).float().mean().item())
    loss, acc = trainer.evaluate()
    assert loss == pytest.approx(want[0], rel=1e-4) and acc == pytest.approx(want[1], abs=1e-6)
    # The same weights at fp32: another test loss (the autocast is real), the same eigenvalue.
    fp32 = Trainer(TrainConfig(**common, out=str(tmp_path / "f")), data=digits)
    fp32.model.load_state_dict(trainer.model.state_dict())
    assert fp32.evaluate()[0] != pytest.approx(loss, rel=1e-6)
    assert fp32.estimate_eig()[0] == pytest.approx(trainer.estimate_eig()[0], rel=1e-6)
    with pytest.raises(UserError, match="--precision must be one of fp32, bf16"):
        TrainConfig(precision="fp16", out=str(tmp_path / "n")).validate()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (scripts/gpu_checks.sh runs it on one)")
def test_on_a_gpu_a_bf16_run_trains_with_float32_weights(digits, tmp_path: Path) -> None:
    from hvd_abs.training import train

    summary = train(TrainConfig(method="absa", dataset="digits", model="cnn", epochs=3, precision="bf16",
                                device="cuda", quiet=True, out=str(tmp_path / "run")), data=digits)
    assert summary["epochs"] == 3 and summary["final_test_acc"] > 0.5
    weights = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert all(v.dtype in (torch.float32, torch.int64) for v in weights.values())
