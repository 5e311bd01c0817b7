"""JPEG decoders for the streaming path: images/s of one process on one thread, for ImageNet's
two recipes at --image-size (evaluation: shorter side to S/0.875, centre S x S crop; training:
random-resized crop and flip), on the ImageNet-like folder bench_data.py uses (300-500 px JPEGs).

  hvd_abs         hvd_abs.data.streaming.ImageFiles.decode: Pillow's decoder (at a reduced DCT
                  scale, 1/2, 1/4 or 1/8, when the output is that much smaller: draft mode), then
                  torch's antialiased uint8 resize
  pillow          Pillow's decoder with draft mode and Pillow's own resize (hvd_abs before)
  torchvision.io  torchvision.io.decode_jpeg of the file's bytes (full size), then
                  transforms.v2.functional's resize + centre crop / resized_crop + flip

Every decoder reads the same files in the same order (the page cache warmed first). Writes
benchmarks/results/decoders.json (or --out) and prints it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from hvd_abs.atomic import write_text_atomic  # noqa: E402
from hvd_abs.errors import UserError, user_errors_exit_2  # noqa: E402


def _crop_box(W: int, H: int, i: int) -> tuple[int, int, int, int, bool]:
    """(top, left, h, w, flip): RandomResizedCrop's search, drawn from (0, 0, i) as hvd_abs's."""
    import numpy as np

    rng = np.random.default_rng([0, 0, i])
    for _ in range(10):
        target, aspect = H * W * rng.uniform(0.08, 1.0), math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= W and 0 < ch <= H:
            top, left = int(rng.integers(0, H - ch + 1)), int(rng.integers(0, W - cw + 1))
            break
    else:
        top, left, ch, cw = 0, 0, H, W
    return top, left, ch, cw, bool(rng.integers(0, 2))


def _torchvision(path: str, size: int, recipe: str, i: int):
    import torchvision.io as tio
    import torchvision.transforms.v2.functional as F

    img = tio.decode_jpeg(tio.read_file(path), mode=tio.ImageReadMode.RGB)  # (3, H, W) uint8
    if recipe == "eval":
        return F.center_crop(F.resize(img, round(size / 0.875), antialias=True), [size, size])
    top, left, ch, cw, flip = _crop_box(img.shape[2], img.shape[1], i)
    out = F.resized_crop(img, top, left, ch, cw, [size, size], antialias=True)
    return F.horizontal_flip(out) if flip else out


def _pillow(path: str, size: int, recipe: str, i: int):
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        W, H = im.size
        if recipe == "eval":
            side = round(size / 0.875)
            im.draft("RGB", (side, side))
            rgb = im.convert("RGB")
            scale = side / min(rgb.size)
            rgb = rgb.resize((max(side, round(rgb.size[0] * scale)), max(side, round(rgb.size[1] * scale))),
                             Image.Resampling.BILINEAR)
            left, top = (rgb.size[0] - size) // 2, (rgb.size[1] - size) // 2
            out = rgb.crop((left, top, left + size, top + size))
        else:
            top, left, ch, cw, flip = _crop_box(W, H, i)
            im.draft("RGB", (math.ceil(W * size / cw), math.ceil(H * size / ch)))
            sx, sy = im.size[0] / W, im.size[1] / H
            out = im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR,
                                           box=(left * sx, top * sy, (left + cw) * sx, (top + ch) * sy))
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else out
        return np.array(out)


def rates(folder: Path, size: int, images: int) -> dict[str, dict[str, float]]:
    import torch

    from hvd_abs.data.image_folder import _scan_image_folder
    from hvd_abs.data.streaming import ImageFiles

    torch.set_num_threads(1)
    paths = _scan_image_folder(folder)[0].paths[:images]
    files = ImageFiles(paths, (size, size))
    for p in paths:  # (the page cache: every decoder reads from memory)
        Path(p).read_bytes()
    decoders = {
        "hvd_abs": lambda i, r: files.decode(i, 0, r),
        "pillow": lambda i, r: _pillow(files.path(i), size, r, i),
        "torchvision.io": lambda i, r: _torchvision(files.path(i), size, r, i),
    }
    out: dict[str, dict[str, float]] = {name: {} for name in decoders}
    for recipe in ("eval", "rrc-flip"):
        for name, decode in decoders.items():
            decode(0, recipe)  # (first-use work, not timed)
            t0 = time.perf_counter()
            for i in range(len(paths)):
                decode(i, recipe)
            out[name][recipe] = len(paths) / (time.perf_counter() - t0)
    return out


@user_errors_exit_2
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", default=os.path.expanduser("~/.cache/hvd_abs/bench_data"))
    p.add_argument("--images", type=int, default=400, help="JPEGs decoded by each decoder and recipe")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "decoders.json"))
    args = p.parse_args(argv)
    if args.images < 1 or args.image_size < 8:
        raise UserError("--images must be at least 1 and --image-size at least 8")
    from hvd_abs.testing.image_folder import make_image_folder

    import torchvision

    base = make_image_folder(Path(args.cache), classes=100, train_per_class=max(20, math.ceil(args.images / 100)),
                             val_per_class=2)
    res = {"machine": os.uname().nodename, "args": vars(args), "torchvision": torchvision.__version__,
           "images_per_s": rates(base, args.image_size, args.images)}
    rate = res["images_per_s"]
    res["hvd_abs_vs"] = {other: {r: rate["hvd_abs"][r] / rate[other][r] for r in rate[other]}
                         for other in ("pillow", "torchvision.io")}
    text = json.dumps(res, indent=1)
    write_text_atomic(Path(args.out), text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
