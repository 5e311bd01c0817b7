"""Scanning ImageFolder layouts: train/<class>/* and test/<class>/* or val/<class>/* (Tiny-ImageNet's
val/images + val_annotations.txt too) into file lists and labels."""
from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from hvd_abs.errors import UserError

# The package's one logger name, as before the split (log formats show %(name)s).
log = logging.getLogger("hvd_abs.data")

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")

# Folder names tried, in order, for the evaluation split of an image folder. ImageNet and
# Tiny-ImageNet ship labelled "val" folders; Tiny-ImageNet's "test" has no labels.
_EVAL_SPLITS: tuple[str, ...] = ("test", "val")


@dataclasses.dataclass
class _Split:
    paths: list[str]
    labels: list[int]


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


def _looks_like_image_folder(root: Path) -> bool:
    train = root / "train"
    return train.is_dir() and bool(_class_dirs(train)) and any((root / s).is_dir() for s in _EVAL_SPLITS)


def _image_files(folder: Path) -> Iterator[str]:
    # Recursive, so ImageNet-style train/<class>/*.JPEG and Tiny-ImageNet's train/<class>/images/* both work.
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        for f in sorted(filenames):
            if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."):
                yield os.path.join(dirpath, f)


def _scan_class_split(split_dir: Path, classes: list[str]) -> _Split:
    index = {c: i for i, c in enumerate(classes)}
    paths: list[str] = []
    labels: list[int] = []
    for c in _class_dirs(split_dir):
        if c not in index:
            raise UserError(f"{split_dir / c} is a class that {split_dir.parent / 'train'} lacks; "
                            f"the evaluation split's classes must be a subset of the training classes")
        files = list(_image_files(split_dir / c))
        paths += files
        labels += [index[c]] * len(files)
    return _Split(paths, labels)


def _scan_annotated_split(split_dir: Path, classes: list[str]) -> _Split:
    """Tiny-ImageNet's val/: images/<file> with labels in val_annotations.txt (file<TAB>wnid<TAB>...)."""
    index = {c: i for i, c in enumerate(classes)}
    paths: list[str] = []
    labels: list[int] = []
    for line in (split_dir / "val_annotations.txt").read_text().splitlines():
        parts = line.split("\t")
        if len(parts) < 2:
            continue
        if parts[1] not in index:
            raise UserError(f"{split_dir / 'val_annotations.txt'} labels {parts[0]} as {parts[1]!r}, "
                            f"which is not a class folder of {split_dir.parent / 'train'}")
        paths.append(str(split_dir / "images" / parts[0]))
        labels.append(index[parts[1]])
    order = sorted(range(len(paths)), key=paths.__getitem__)
    return _Split([paths[i] for i in order], [labels[i] for i in order])


def _scan_image_folder(root: Path) -> tuple[_Split, _Split, list[str], str]:
    """(train, eval, classes, eval folder name) of an image folder, or a UserError naming the layout."""
    layout = "train/<class>/* and test/<class>/* (or val/<class>/*)"
    if root.exists() and not root.is_dir():
        raise UserError(f"data directory {root} is a file, not a directory; pass --data-dir PATH to a folder "
                        f"with {layout}")
    if not root.is_dir():
        raise UserError(f"data directory {root} does not exist; pass --data-dir PATH to a folder with {layout}")
    train_dir = root / "train"
    if not train_dir.is_dir() or not _class_dirs(train_dir):
        raise UserError(f"{root} has no train/<class>/ folders; --data-dir must point at a folder with {layout}")
    classes = _class_dirs(train_dir)
    train = _scan_class_split(train_dir, classes)
    if not train.paths:
        raise UserError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {train_dir}")
    for split in _EVAL_SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        if (split_dir / "val_annotations.txt").is_file():
            evaluation = _scan_annotated_split(split_dir, classes)
        elif set(_class_dirs(split_dir)) & set(classes):
            evaluation = _scan_class_split(split_dir, classes)
        else:
            # No folder named like a training class: unlabelled, e.g. Tiny-ImageNet's test/images.
            log.info("skipping %s: its folders are not training classes, so it has no labels", split_dir)
            continue
        if evaluation.paths:
            present = set(train.labels)
            empty = [c for i, c in enumerate(classes) if i not in present]
            if empty:
                log.warning("%d class folders under %s hold no images (e.g. %s)", len(empty), train_dir, empty[0])
            return train, evaluation, classes, split
    raise UserError(f"{root} has no labelled evaluation split; --data-dir must point at a folder with {layout}")
