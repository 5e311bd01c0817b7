"""Your own model and data with hvd_abs: ABS/ABSA on a model and tensors this script defines.

    python examples/custom_model.py --method absa --epochs 10 --out runs/custom --width 32
    horovodrun -np 2 python examples/custom_model.py --out runs/custom2          # a fixed world
    hvd-abs launch horovod --max-np 2 --script examples/custom_model.py -- --out runs/custom3
    hvd-abs launch ray --address local --max-workers 2 --script examples/custom_model.py -- --out runs/custom4

Every `hvd-abs train` option works (--method, --epochs, --batch, --max-batch, --lr, --resume, ...);
the script's own options (here --width) are parsed by its own argparse parser, handed to
parse_train_args, which refuses a clash with a train option and lists both in --help.
The data: scikit-learn's bundled 8x8 handwritten digits (offline), standing in for yours.
"""
import argparse

import torch
from torch import nn

import hvd_abs
from hvd_abs.models import Normalize


class SmallNet(nn.Module):
    """Any classifier taking [0, 1] inputs to logits; it normalises inside (ABSA's FGSM works on
    the unnormalised pixels)."""

    def __init__(self, mean, std, width: int, num_classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            Normalize(mean, std),
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(width * 16, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def load_digits() -> hvd_abs.Splits:
    from sklearn.datasets import load_digits as sk_digits

    digits = sk_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8) in [0, 1]
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))  # the same split on every worker
    test, train = perm[:360], perm[360:]
    return hvd_abs.splits_from_tensors(x[train], y[train], x[test], y[test], name="digits-custom",
                                       classes=[str(d) for d in range(10)])


@hvd_abs.user_errors_exit_2
def main() -> None:
    # allow_abbrev=False: an abbreviation must not pass for one of these options.
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--width", type=int, default=16, help="channels of each convolution")
    cfg, own = hvd_abs.parse_train_args(parser=parser)  # every `hvd-abs train` option, and --width
    data = load_digits()
    hvd_abs.fit(cfg, model=lambda: SmallNet(data.mean, data.std, own.width, data.num_classes), data=data)


if __name__ == "__main__":
    main()
