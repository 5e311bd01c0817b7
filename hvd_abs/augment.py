"""Training-data augmentation (`--augment`): random crop with zero padding and horizontal flip,
the standard Cifar recipe, drawn per sample from (seed, epoch, sample index).

torchvision's transforms draw from the RNG of whichever loader process reads a sample, so the crop
a sample gets would depend on the world size: an elastic job would train differently after each
resize, and a resume would not continue the run it left. Here each sample's crop offsets and flip
are a fixed function of the run's seed, the epoch and the sample's index in the training set,
drawn for the whole epoch at once (3 small ints a sample), so an update is the same on 1 or N
workers, across resizes and across a resume. Each micro-batch is then cropped and flipped on the
device in one gather.

Only training updates see it: the growth check's Hessian samples (as the reference: "no
augmentation") and the test split are taken as they are.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hvd_abs.errors import UserError

AUGMENTS = ("none", "flip", "crop", "crop-flip", "rrc-flip")
# Done while decoding a streamed file (hvd_abs.data.streaming), from the whole image.
DECODE_AUGMENTS = ("rrc-flip",)


def crop_pad(height: int, width: int) -> int:
    """Zero padding (and so the largest shift) of a random crop: 1/8 of the smaller side, at least
    1 pixel: 4 at 32x32, the Cifar recipe."""
    return max(1, min(height, width) // 8)


def crop_flip(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor, pad: int) -> torch.Tensor:
    """x (m, C, H, W) padded by `pad` zeros on each side, cropped back to H x W at offset (dy, dx)
    in [0, 2 pad] (pad = (dy, dx) = 0: no crop), then mirrored left-right where `flip` (m,) is
    true: torchvision's RandomCrop(padding=pad) then RandomHorizontalFlip, per sample.

    Zeros are black on the [0, 1] pixel scale, as there: hvd_abs models normalise inside."""
    m, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad)) if pad else x  # (m, C, H + 2p, W + 2p)
    rows = dy[:, None] + torch.arange(h, device=x.device)  # (m, H)
    cols = torch.arange(w, device=x.device)
    cols = torch.where(flip[:, None], w - 1 - cols, cols) + dx[:, None]  # (m, W)
    batch = torch.arange(m, device=x.device)[:, None, None, None]
    channel = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]  # (m, C, H, W)


class Augmenter:
    """`--augment kind` for a training set of `num_samples` images of `image_shape` (C, H, W)."""

    def __init__(self, kind: str, seed: int, num_samples: int, image_shape: tuple[int, ...],
                 streamed: bool = False) -> None:
        if kind not in AUGMENTS:
            raise UserError(f"--augment must be one of {', '.join(AUGMENTS)}, got {kind!r}")
        if kind in DECODE_AUGMENTS and not streamed:
            raise UserError(f"--augment {kind} crops the original image files: pass --data-loading stream (and an "
                            f"image folder), or --augment crop-flip for data held in memory (a Dataset of your own: put "
                            f"RandomResizedCrop in its transforms)")
        if kind not in ("none", *DECODE_AUGMENTS) and (len(image_shape) != 3 or min(image_shape[1:]) < 2):
            raise UserError(f"--augment {kind} crops and flips images (C, H, W) of at least 2 x 2 pixels, but the "
                            f"training samples are shaped {tuple(image_shape)}: pass --augment none")
        self.kind = kind
        self.seed = int(seed)
        self.num_samples = int(num_samples)
        self.pad = crop_pad(*image_shape[1:]) if "crop" in kind else 0
        self._epoch: int | None = None
        self._draws = torch.empty(0, 3, dtype=torch.int64)

    @property
    def active(self) -> bool:
        return self.kind not in ("none", *DECODE_AUGMENTS)

    def draws(self, epoch: int) -> torch.Tensor:
        """(num_samples, 3) int64: each sample's (dy, dx, flip) in `epoch`; the last epoch's is kept."""
        if self._epoch != epoch:
            # Its own stream: not the epoch permutation's (seed * 1_000_003 + epoch), nor the
            # growth check's samples.
            gen = torch.Generator().manual_seed((self.seed * 1_000_033 + 7_368_787 * (int(epoch) + 1)) % (2**63 - 1))
            n = self.num_samples
            shift = torch.randint(0, 2 * self.pad + 1, (n, 2), generator=gen)
            flip = torch.randint(0, 2, (n, 1), generator=gen) if "flip" in self.kind else torch.zeros(n, 1, dtype=torch.int64)
            self._draws, self._epoch = torch.cat([shift, flip], dim=1), epoch
        return self._draws

    def __call__(self, x: torch.Tensor, indices: torch.Tensor, epoch: int) -> torch.Tensor:
        """x (m, C, H, W): the training samples `indices` (m,) of `epoch`, augmented; x itself for "none"."""
        if not self.active:
            return x
        d = self.draws(epoch)[indices].to(x.device, non_blocking=True)  # (m, 3)
        return crop_flip(x, d[:, 0], d[:, 1], d[:, 2].bool(), self.pad)
