"""Disk checkpoints: atomic, checksummed, and loaded without unpickling arbitrary objects.

File layout: `HVDABS-CKPT 1 <sha256 of payload>\n` then the payload, a `torch.save` of a state
dict. Written to a temp file in the same directory, fsynced, then `os.replace`d (and the
directory fsynced), so a crash leaves either the old set of checkpoints or the new one, never
half a file. Loading checks the header and checksum first and then uses
`torch.load(weights_only=True)`: tensors, numbers, strings and containers only.
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

MAGIC = b"HVDABS-CKPT 1 "
_NAME = re.compile(r"^ckpt-(\d{6})\.pt$")


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


def save_checkpoint(directory: str | os.PathLike, state: dict[str, Any], updates: int, keep: int = 3) -> Path:
    """Write `state` as `directory/ckpt-<updates>.pt` atomically; keep the newest `keep` files."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return save_payload(directory, buf.getvalue(), updates, keep)


def save_payload(directory: str | os.PathLike, payload: bytes, updates: int, keep: int = 3) -> Path:
    """save_checkpoint for a state already serialized with torch.save (a relayed checkpoint)."""
    if type(updates) is not int or updates < 0:
        raise ValueError(f"a checkpoint's update count must be a whole number >= 0, got {updates!r}")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    header = MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n"
    path = write_atomic(d / checkpoint_name(updates), lambda f: (f.write(header), f.write(payload)),
                        mode=0o600, sync_dir=True)
    for old in list_checkpoints(d)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Verify and load one checkpoint; raises CheckpointError saying what is wrong with it."""
    path = Path(path)
    data = path.read_bytes()
    newline = data.find(b"\n")
    if not data.startswith(MAGIC) or newline != len(MAGIC) + 64:
        raise CheckpointError(f"{path}: not an hvd_abs checkpoint (bad header)")
    expected = data[len(MAGIC):newline].decode("ascii", "replace")
    payload = data[newline + 1:]
    if hashlib.sha256(payload).hexdigest() != expected:
        raise CheckpointError(f"{path}: checksum mismatch (truncated, corrupted or modified)")
    try:
        return torch.load(io.BytesIO(payload), weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - whatever torch raises, it is not loadable
        raise CheckpointError(f"{path}: payload does not load with weights_only=True ({exc})") from None


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
