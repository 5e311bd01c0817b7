"""The run's data: the data set (loaded, or preloaded by a warm standby), the fixed random
subsets of --train-subset / --test-subset, and the fingerprint a resume checks."""
from __future__ import annotations

import dataclasses
import zlib
from pathlib import Path
from typing import Any

import torch

from hvd_abs.errors import UserError

# Data sets loaded ahead of time by a warm standby (hvd_abs/launch/standby.py), by what was asked.
_PRELOADED: dict[tuple[Any, ...], Any] = {}


def _data_key(dataset: str, data_dir: str | None, image_size: int | None, loading: str) -> tuple[Any, ...]:
    return dataset, str(Path(data_dir).expanduser().resolve()) if data_dir else None, image_size, loading


def load_data(dataset: str, data_dir: str | None, download: bool = False, image_size: int | None = None,
              loading: str = "auto") -> Any:
    """The data set a run of these options trains on (before its subsets)."""
    from hvd_abs.data import load_dataset

    return load_dataset(dataset, data_dir=data_dir, download=download, image_size=image_size, loading=loading)


def preload(dataset: str, data_dir: str | None, download: bool = False, image_size: int | None = None,
            loading: str = "auto") -> Any:
    """Load a data set now (into memory, or its file list when streamed), for the run the same
    process starts later; returns it."""
    data = load_data(dataset, data_dir, download, image_size, loading)
    _PRELOADED[_data_key(dataset, data_dir, image_size, loading)] = data
    return data


def run_data(cfg: Any, data: Any = None) -> Any:
    """The Splits a run trains on: `data` (or cfg.dataset: preloaded, else loaded), with the
    subsets cfg asks for. Raises UserError for a subset or a batch larger than the data."""
    if data is None:
        data = _PRELOADED.pop(_data_key(cfg.dataset, cfg.data_dir, cfg.image_size, cfg.data_loading), None)
    if data is None:
        data = load_data(cfg.dataset, cfg.data_dir, cfg.download, cfg.image_size, cfg.data_loading)
    for asked, have, flag, split in ((cfg.train_subset, len(data.train_y), "--train-subset", "training"),
                                     (cfg.test_subset, len(data.test_y), "--test-subset", "test")):
        # (It would silently be all of them. A resumed run keeps the --train-subset it trained
        # on; a --test-subset may change on a resume.)
        if asked is not None and asked > have and (cfg.resume is None or flag == "--test-subset"):
            raise UserError(f"{flag} {asked} exceeds the {have} {split} samples: pass at most {have}, or leave "
                            f"{flag} out")
    data = subset(data, cfg.train_subset, cfg.test_subset)
    n_train = int(data.train_y.shape[0])
    if cfg.initial_batch > n_train:
        # Only full batches are taken: this run would make no update at all.
        raise UserError(f"--batch {cfg.initial_batch} exceeds the {n_train} training samples: pass a "
                        f"smaller --batch (or a larger --train-subset)")
    return data


def subset(data: Any, n_train: int | None, n_test: int | None) -> Any:
    """`data` with a fixed random subset (seed 12345, the same for every run and rank) of its
    training and test samples; `data` itself when neither is given."""
    if not n_train and not n_test:
        return data
    from hvd_abs.data.streaming import Streamed

    gen = torch.Generator().manual_seed(12_345)
    pick = lambda n, k: torch.randperm(n, generator=gen)[:k].sort().values if k and k < n else None  # noqa: E731
    tr, te = pick(len(data.train_y), n_train), pick(len(data.test_y), n_test)
    sel = lambda x, i: x if i is None else x.select(i) if isinstance(x, Streamed) else x[i]  # noqa: E731
    return dataclasses.replace(data, train_x=sel(data.train_x, tr), train_y=sel(data.train_y, tr),
                               test_x=sel(data.test_x, te), test_y=sel(data.test_y, te))


def data_id(data: Any) -> dict[str, Any]:
    """What tells the training data a run trains on from other data, cheaply and bit-exactly (any
    thread count, any machine): size, sample shape, classes, and crc32s of all training labels and
    of 64 evenly spaced training inputs. Kept in checkpoints; a resume on other data is refused.
    (The test split may change on a resume, as --test-subset may.)"""
    from hvd_abs.data.streaming import take

    n = len(data.train_y)
    picks = torch.linspace(0, n - 1, steps=min(64, n)).long()
    crc = lambda t: zlib.crc32(t.detach().cpu().contiguous().numpy().tobytes())  # noqa: E731
    # (In canonical dtypes: int32 and int64 copies of the same labels are the same data.)
    return {"train samples": n, "sample shape": list(data.train_x.shape[1:]), "classes": int(data.num_classes),
            "label crc32": crc(data.train_y.long()), "input crc32": crc(take(data.train_x, picks))}
