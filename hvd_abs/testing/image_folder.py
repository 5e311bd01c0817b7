"""An ImageNet-like image folder for tests and benchmarks: train/<wnid>/*.JPEG and val/<wnid>/*.JPEG,
JPEGs of ImageNet's typical sizes (shorter side 300-500 px at a random aspect), many classes.

Each class has its own colour and stripe frequency, so a model can learn it; images are smooth
(compressed like photos: about 30-110 KB at quality 90) rather than noise. Made once per arguments
into a folder named by them, so the tests and the benchmarks reuse it.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np


def make_image_folder(root: str | os.PathLike[str], classes: int = 100, train_per_class: int = 100,
                      val_per_class: int = 10, min_side: int = 300, max_side: int = 500, seed: int = 0,
                      quality: int = 90) -> Path:
    """root/<key>/{train,val}/n<class>/*.JPEG, made when missing; returns that folder."""
    from PIL import Image

    spec = f"{classes}-{train_per_class}-{val_per_class}-{min_side}-{max_side}-{seed}-{quality}"
    out = Path(root).expanduser() / f"imagenet-like-{hashlib.sha256(spec.encode()).hexdigest()[:10]}"
    if (out / ".complete").is_file():
        return out
    rng = np.random.default_rng(seed)
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = out / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            crng = np.random.default_rng([seed, c])
            colour, freq = crng.uniform(40, 215, 3), crng.uniform(0.01, 0.08)
            for k in range(per_class):
                short = int(rng.integers(min_side, max_side + 1))
                long = int(short * rng.uniform(1.0, 1.5))
                w, h = (long, short) if rng.integers(0, 2) else (short, long)
                yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
                phase = rng.uniform(0, 2 * np.pi)
                wave = np.sin(freq * (xx * np.cos(phase) + yy * np.sin(phase)))[..., None]  # (h, w, 1)
                img = colour + 35 * wave + rng.normal(0, 6, (1, 1, 3))
                im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
                im.save(folder / f"{split}_{c}_{k}.JPEG", quality=quality)  # (.complete marks the whole set)
    (out / ".complete").write_text(spec + "\n")
    return out
