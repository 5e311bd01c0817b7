"""--augment: per-sample crops and flips from (seed, epoch, index), checked against torchvision's
own functional transforms, and independent of how the samples are batched (so of the world size)."""
from __future__ import annotations

import pytest
import torch
import torchvision.transforms.functional as TF

from hvd_abs.augment import Augmenter, crop_flip, crop_pad
from hvd_abs.errors import UserError


def _reference(x: torch.Tensor, draws: torch.Tensor, pad: int) -> torch.Tensor:
    """torchvision per sample: pad with zeros, crop at (dy, dx), then mirror when flipped."""
    h, w = x.shape[-2:]
    out = []
    for img, (dy, dx, flip) in zip(x, draws.tolist()):
        img = TF.crop(TF.pad(img, [pad], fill=0), dy, dx, h, w)
        out.append(TF.hflip(img) if flip else img)
    return torch.stack(out)


@pytest.mark.parametrize("kind,shape", [("crop-flip", (3, 32, 32)), ("crop", (1, 8, 12)), ("flip", (2, 5, 7))])
def test_each_sample_is_cropped_and_flipped_as_torchvision_does(kind: str, shape: tuple[int, ...]) -> None:
    n = 64
    aug = Augmenter(kind, seed=3, num_samples=n, image_shape=shape)
    x = torch.rand(n, *shape)
    idx = torch.randperm(n)[:40]
    draws = aug.draws(0)[idx]
    assert torch.equal(aug(x[idx], idx, 0), _reference(x[idx], draws, aug.pad))
    if kind == "flip":
        assert aug.pad == 0 and not draws[:, :2].any()  # no shift without crop
    if kind == "crop":
        assert aug.pad == 1 and not draws[:, 2].any()  # no mirror without flip (SVHN digits)
    assert crop_pad(32, 32) == 4 and crop_pad(8, 12) == 1


def test_a_sample_gets_the_same_crop_whatever_batch_or_worker_takes_it() -> None:
    n = 1000
    x = torch.rand(n, 3, 16, 16)
    a = Augmenter("crop-flip", seed=7, num_samples=n, image_shape=(3, 16, 16))
    b = Augmenter("crop-flip", seed=7, num_samples=n, image_shape=(3, 16, 16))  # another rank
    idx = torch.randperm(n)[:256]
    whole = a(x[idx], idx, 5)
    pieces = torch.cat([b(x[idx[i:i + 100]], idx[i:i + 100], 5) for i in range(0, 256, 100)])
    assert torch.equal(whole, pieces)
    assert not torch.equal(a.draws(6), b.draws(5))  # a new draw every epoch...
    assert torch.equal(a.draws(5), Augmenter("crop-flip", 7, n, (3, 16, 16)).draws(5))  # ...fixed by it
    assert not torch.equal(Augmenter("crop-flip", 8, n, (3, 16, 16)).draws(5), a.draws(5))  # and the seed


def test_the_draws_do_not_come_from_the_process_rng() -> None:
    """A resume restores torch's RNG, so only this shows draws that a worker's RNG would change."""
    torch.manual_seed(1)
    first = Augmenter("crop-flip", seed=4, num_samples=500, image_shape=(3, 16, 16)).draws(2)
    torch.manual_seed(2)
    torch.rand(7)
    assert torch.equal(Augmenter("crop-flip", seed=4, num_samples=500, image_shape=(3, 16, 16)).draws(2), first)


def test_draws_cover_every_offset_and_flip_half_the_samples() -> None:
    d = Augmenter("crop-flip", seed=0, num_samples=20_000, image_shape=(3, 32, 32)).draws(0)
    for col in (0, 1):
        counts = torch.bincount(d[:, col], minlength=9)
        assert counts.numel() == 9 and counts.min() > 20_000 / 9 * 0.9  # 0..8, near uniform
    assert abs(d[:, 2].float().mean().item() - 0.5) < 0.02
    # dy and dx are drawn apart: not the same offset for every sample.
    assert (d[:, 0] != d[:, 1]).float().mean() > 0.8


def test_a_centred_unflipped_crop_is_the_image_and_shifts_fill_with_zeros() -> None:
    x = torch.rand(2, 3, 8, 8) + 1.0  # no zero inside the images
    zero = torch.zeros(2, dtype=torch.int64)
    assert torch.equal(crop_flip(x, zero + 1, zero + 1, zero.bool(), 1), x)
    corner = crop_flip(x, zero, zero, zero.bool(), 1)  # shifted down-right by one pixel
    assert (corner[:, :, 0, :] == 0).all() and (corner[:, :, :, 0] == 0).all()
    assert torch.equal(corner[:, :, 1:, 1:], x[:, :, :-1, :-1])


def test_non_image_data_and_unknown_kinds_are_refused(tmp_path) -> None:
    from hvd_abs import splits_from_tensors
    from hvd_abs.training import TrainConfig, Trainer

    with pytest.raises(UserError, match="--augment must be one of none, flip, crop, crop-flip"):
        TrainConfig(augment="mixup", out=str(tmp_path / "a")).validate()
    g = torch.Generator().manual_seed(0)
    data = splits_from_tensors(torch.rand(64, 5, generator=g), torch.randint(0, 2, (64,), generator=g),
                               torch.rand(16, 5, generator=g), torch.randint(0, 2, (16,), generator=g))
    model = torch.nn.Linear(5, 2)
    with pytest.raises(UserError, match=r"training samples are shaped \(5,\): pass --augment none"):
        Trainer(TrainConfig(augment="crop", base_batch=16, out=str(tmp_path / "b"), quiet=True), data=data, model=model)
    Trainer(TrainConfig(augment="none", base_batch=16, out=str(tmp_path / "c"), quiet=True), data=data, model=model)


def test_updates_train_on_the_augmented_images_and_nothing_else_does(tmp_path) -> None:
    """One update with and without --augment from the same weights: other inputs, other weights;
    the growth check's samples and the evaluation are the raw data."""
    from hvd_abs.data import load_dataset
    from hvd_abs.training import TrainConfig, Trainer

    data = load_dataset("digits")
    raw = data.train_x.flatten(1)  # (N, 64)
    inputs, weights = {}, {}
    for kind in ("none", "crop-flip"):
        t = Trainer(TrainConfig(method="abs", dataset="digits", model="mlp", augment=kind, threads=1, quiet=True,
                                eig_samples=128, out=str(tmp_path / kind)), data=data)
        seen: list[torch.Tensor] = []
        hook = t.model.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
        t.step()
        inputs[kind], weights[kind] = seen[0], [p.detach().clone() for p in t.params]
        seen.clear()
        t.evaluate()
        assert torch.equal(torch.cat(seen), data.test_x)
        hook.remove()
        x_eig, _ = t.eig_batches()[0]  # every row one of the training images as it is
        assert (x_eig.flatten(1)[:, None, :] == raw[None]).all(-1).any(1).all()
    assert inputs["none"].shape == inputs["crop-flip"].shape and not torch.equal(inputs["none"], inputs["crop-flip"])
    assert (inputs["none"].flatten(1)[:, None, :] == raw[None]).all(-1).any(1).all()
    assert any(not torch.equal(a, b) for a, b in zip(weights["none"], weights["crop-flip"]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (scripts/gpu_checks.sh runs it on one)")
def test_on_a_gpu_the_crops_are_the_cpus_and_a_run_trains(tmp_path) -> None:
    from hvd_abs.data import load_dataset
    from hvd_abs.training import TrainConfig, train

    n = 300
    x = torch.rand(n, 3, 32, 32)
    aug = Augmenter("crop-flip", seed=1, num_samples=n, image_shape=(3, 32, 32))
    idx = torch.randperm(n)[:128]
    assert torch.equal(aug(x[idx].cuda(), idx, 3).cpu(), aug(x[idx], idx, 3))
    summary = train(TrainConfig(method="absa", dataset="digits", model="cnn", epochs=2, augment="crop-flip",
                                device="cuda", quiet=True, out=str(tmp_path / "run")), data=load_dataset("digits"))
    assert summary["epochs"] == 2 and summary["final_test_acc"] > 0.2
