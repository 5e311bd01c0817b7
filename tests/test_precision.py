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
    with pytest.raises(UserError, match="--precision must be one of fp32, bf16, fp16"):
        TrainConfig(precision="fp8", out=str(tmp_path / "n")).validate()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (scripts/gpu_checks.sh runs it on one)")
def test_on_a_gpu_a_bf16_run_trains_with_float32_weights(digits, tmp_path: Path) -> None:
    from hvd_abs.training import train

    summary = train(TrainConfig(method="absa", dataset="digits", model="cnn", epochs=3, precision="bf16",
                                device="cuda", quiet=True, out=str(tmp_path / "run")), data=digits)
    assert summary["epochs"] == 3 and summary["final_test_acc"] > 0.5
    weights = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert all(v.dtype in (torch.float32, torch.int64) for v in weights.values())


def test_fp16_scales_the_loss_skips_an_overflowed_step_and_resumes_exactly(digits, tmp_path: Path) -> None:
    """--precision fp16: forward passes under float16 autocast, the loss scaled before backward
    and the summed gradient unscaled before the step (weights stay float32); a step whose gradient
    overflowed is skipped and the scale halved; the scale is in the checkpoint, so a run stopped
    and resumed is the run that went through."""
    from click.testing import CliRunner

    from hvd_abs.cli import main
    from hvd_abs.metrics import read_metrics

    common = dict(method="absa", model="mlp", epochs=3, batch=64, base_batch=32, lr=0.1, eig_samples=64, quiet=True,
                  precision="fp16", threads=1)
    trainer = Trainer(TrainConfig(**common, out=str(tmp_path / "t")), data=digits)
    assert trainer.scaler.is_enabled() and trainer.forward.dtype == torch.float16
    before = [p.detach().clone() for p in trainer.params]
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 30)  # far past float16's range (2 ** 16)
    skipped = 0
    while all(torch.equal(a, p) for a, p in zip(before, trainer.params)) and skipped < 100:
        assert trainer.step()
        skipped += 1
    skipped -= 1  # (the last step applied)
    assert 1 <= skipped < 20 and trainer.scaler.get_scale() == 2.0 ** (30 - skipped)  # halved per overflow
    assert all(p.dtype == torch.float32 for p in trainer.params)

    flags = ["--dataset", "digits", "--model", "mlp", "--method", "absa", "--epochs", "3", "--base-batch", "32",
             "--eig-samples", "64", "--precision", "fp16", "--threads", "1", "--quiet", "--log-every", "0"]
    whole = CliRunner().invoke(main, ["train", *flags, "--out", str(tmp_path / "whole")])
    cut = CliRunner().invoke(main, ["train", *flags, "--stop-at-update", "60", "--out", str(tmp_path / "cut")])
    more = CliRunner().invoke(main, ["train", "--quiet", "--resume", str(tmp_path / "cut")])
    assert whole.exit_code == cut.exit_code == more.exit_code == 0, whole.output + cut.output + more.output
    untimed = lambda run: [{k: v for k, v in e.items() if k not in ("epoch_s", "samples_per_s", "second_order_s")}
                           for e in read_metrics(tmp_path / run)[0]]  # noqa: E731
    assert untimed("cut") == untimed("whole")
    epochs = read_metrics(tmp_path / "whole")[0]
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"] and epochs[-1]["test_acc"] > 0.7
