"""Data sets as in-memory tensors: train and test splits of [0, 1] images with integer labels.

Every loader returns float32 images of shape (N, C, H, W) with values in [0, 1], never normalised:
the models normalise inside (hvd_abs.models), so FGSM's eps stays on the [0, 1] pixel scale.

Sources:
  digits       scikit-learn's bundled 8x8 handwritten digits (offline; the default)
  cifar10      torchvision's CIFAR-10, or an ImageFolder tree given with data_dir
  cifar100     torchvision's CIFAR-100, or an ImageFolder tree given with data_dir
  svhn         torchvision's SVHN, or an ImageFolder tree given with data_dir
  imagefolder  data_dir/train/<class>/* and data_dir/{test,val}/<class>/* (Tiny-ImageNet's
               val/images + val_annotations.txt is understood too)

Image folders are decoded once, in parallel, into a uint8 tensor cache
(<cache dir>/datasets/<key>.pt, written atomically) and later loads read that file, so decoding
is never the bottleneck of a run. The key covers the folder's path, the image size and the file
list (count, total size, newest mtime, and the relative paths), so changing the data rebuilds it.
The data folder itself is only read, never written: it may be read-only.
"""
from __future__ import annotations

from hvd_abs.data.cache import CACHE_FORMAT, default_cache_dir
from hvd_abs.data.decode import decode_workers
from hvd_abs.data.image_folder import IMAGE_EXTENSIONS
from hvd_abs.data.sources import DATASETS, load_dataset
from hvd_abs.data.splits import Splits, channel_stats

__all__ = ["CACHE_FORMAT", "DATASETS", "IMAGE_EXTENSIONS", "Splits", "channel_stats", "decode_workers",
           "default_cache_dir", "load_dataset"]
