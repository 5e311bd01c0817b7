"""Disk checkpoints: plain torch files, checksummed, atomic, loaded without unpickling objects.

`ckpt-<updates>.pt` is what `torch.save` wrote (it opens with `torch.load(path,
weights_only=True)`, no hvd_abs needed); `ckpt-<updates>.pt.sha256` beside it holds its sha256
in `sha256sum` format (`sha256sum -c` checks it). `last.pt` is a symlink to the newest. The file
is written to a temp file, fsynced and renamed, its checksum after it, so a crash leaves either
the old set or a new file that is whole; a file without its checksum is not trusted. Loading
checks the checksum first and then uses `torch.load(weights_only=True)`: tensors, numbers,
strings and containers only. Files of the earlier format (a `HVDABS-CKPT 1 <sha256>` header line
before the payload) still load.
"""
from __future__ import annotations

import copy
import hashlib
import io
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from hvd_abs.atomic import write_atomic

log = logging.getLogger(__name__)

MAGIC = b"HVDABS-CKPT 1 "  # the earlier format's header
_NAME = re.compile(r"^ckpt-(\d{6,})\.pt$")
LAST = "last.pt"


def to_host(obj: Any) -> Any:
    """A deep copy of `obj` with every tensor cloned to host memory (a snapshot: later in-place
    updates of the live tensors do not reach it, and it holds no GPU memory)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_host(v) for v in obj)
    return copy.deepcopy(obj)


class CheckpointError(Exception):
    """A checkpoint file that is truncated, corrupted, tampered with or not ours."""


def checkpoint_name(updates: int) -> str:
    return f"ckpt-{updates:06d}.pt"


def checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def save_checkpoint(directory: str | os.PathLike, state: dict[str, Any], updates: int, keep: int = 3) -> Path:
    """Write `state` as `directory/ckpt-<updates>.pt` atomically; keep the newest `keep` files."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return save_payload(directory, buf.getvalue(), updates, keep)


def save_payload(directory: str | os.PathLike, payload: bytes, updates: int, keep: int = 3) -> Path:
    """save_checkpoint for a state already serialized with torch.save (a relayed checkpoint)."""
    if type(updates) is not int or updates < 0:
        raise ValueError(f"a checkpoint's update count must be a whole number >= 0, got {updates!r}")
    if type(keep) is not int or keep < 1:
        raise ValueError(f"keep must be a whole number >= 1, got {keep!r}")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(updates)
    path = write_atomic(d / name, lambda f: f.write(payload), mode=0o600, sync_dir=True)
    line = f"{hashlib.sha256(payload).hexdigest()}  {name}\n".encode()
    write_atomic(checksum_path(path), lambda f: f.write(line), mode=0o600, sync_dir=True)
    _point_last(d, name)
    # The newest `keep` - 1 others stay beside it (by update count). Never this one: a resume from
    # an older checkpoint writes below a higher count; and a file without its checksum (a write
    # cut short) is no checkpoint to keep.
    others = [p for p in list_checkpoints(d) if p != path]
    unfinished = [p for p in others if not is_checkpoint(p)]
    others = [p for p in others if p not in unfinished]
    for old in unfinished + others[:max(len(others) - (keep - 1), 0)]:
        old.unlink(missing_ok=True)
        checksum_path(old).unlink(missing_ok=True)
    return path


def _has_header(path: Path) -> bool:
    """Whether `path` is of the earlier format (its checksum inside)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def _point_last(d: Path, name: str) -> None:
    """`last.pt` -> `name`, replaced atomically (a new link renamed over the old one)."""
    tmp = d / f".{LAST}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(name, tmp)
    os.replace(tmp, d / LAST)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Verify and load one checkpoint; raises CheckpointError saying what is wrong with it."""
    path = Path(path).resolve()  # (last.pt: its checksum is beside the file it links to)
    try:
        return torch.load(io.BytesIO(verified_payload(path)), weights_only=True, map_location="cpu")
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever torch raises, it is not loadable
        raise CheckpointError(f"{path}: payload does not load with weights_only=True ({exc})") from None


def verified_payload(path: str | os.PathLike) -> bytes:
    """The torch.save bytes of checkpoint `path` once its checksum matches (CheckpointError else)."""
    path = Path(path).resolve()
    data = path.read_bytes()
    if data.startswith(MAGIC):
        newline = data.find(b"\n")
        if newline != len(MAGIC) + 64:
            raise CheckpointError(f"{path}: not an hvd_abs checkpoint (bad header)")
        expected, payload = data[len(MAGIC):newline].decode("ascii", "replace"), data[newline + 1:]
    else:
        try:
            expected, payload = checksum_path(path).read_text(encoding="ascii").split()[0], data
        except (OSError, UnicodeDecodeError, IndexError):
            raise CheckpointError(f"{path}: no readable checksum beside it ({checksum_path(path).name}): "
                                  f"a write cut short, or not an hvd_abs checkpoint") from None
    if hashlib.sha256(payload).hexdigest() != expected:
        raise CheckpointError(f"{path}: checksum mismatch (truncated, corrupted or modified)")
    return payload


def updates_of(path: str | os.PathLike) -> int:
    """The update count in a checkpoint's file name."""
    m = _NAME.match(Path(path).name)
    if m is None:
        raise ValueError(f"{path} is not named as a checkpoint (ckpt-<updates>.pt)")
    return int(m.group(1))


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is an hvd_abs checkpoint (either format) rather than some other torch file."""
    path = Path(path).resolve()
    return _has_header(path) or checksum_path(path).is_file()


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Checkpoint files in `directory`, oldest first (by update count in the name)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name)) and p.is_file()]
    return [p for _, p in sorted(found)]


def load_latest(directory: str | os.PathLike) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that verifies, skipping (and logging) damaged ones; None if none."""
    for path in reversed(list_checkpoints(directory)):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as exc:
            log.warning("skipping damaged checkpoint: %s", exc)
    return None
