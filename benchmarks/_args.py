"""Argument checks every benchmark script shares: bad input fails before any work is done, in one
line with exit code 2 (argparse's `error`), never after a long run."""
from __future__ import annotations

import argparse
from pathlib import Path

from hvd_abs.atomic import unwritable_reason

# The one default --data-dir of every benchmark: the shared data folder beside this checkout
# (/work/shared/data/cifar10 for /work/main), as the README's examples (../shared/data/cifar10).
DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


def add_data_dir(p: argparse.ArgumentParser) -> None:
    """The --data-dir option; a folder without CIFAR-10 is refused by hvd_abs.data.load_dataset,
    whose message then says to pass --data-dir."""
    p.add_argument("--data-dir", default=str(DATA_DIR),
                   help=f"CIFAR-10: an image folder with train/ and test/, or torchvision's files (default {DATA_DIR})")


def check_out(p: argparse.ArgumentParser, path: Path, what: str = "--out") -> None:
    """Exit 2 now, not after the whole benchmark, unless a file can be written at `path`."""
    why = unwritable_reason(path)
    if why:
        p.error(f"{what} {path}: {why}; pass another --out")


def check_device(p: argparse.ArgumentParser, device: str) -> None:
    """Exit 2 for --device cuda where torch sees no GPU."""
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda: no CUDA device is visible here; use --device cpu")
