"""The elastic horovodrun command line for a training job (what `hvd-abs launch horovod` runs)."""
from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path


def _option(args: list[str], name: str) -> str | None:
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def build_command(train_args: list[str], *, min_np: int, max_np: int, hostfile: str | None = None,
                  nic: str = "lo", cooldown: str = "5,30", python: str | None = None) -> list[str]:
    """horovodrun argv: elastic (discovery script + min/max np) over Gloo, running
    `python -m hvd_abs train --elastic --max-np N TRAIN_ARGS`. Raises ValueError naming the fix."""
    out = _option(train_args, "--out")
    if not out:
        raise ValueError("elastic training needs a run directory: pass --out DIR among the train options")
    if cooldown and not re.fullmatch(r"\d+,\d+", cooldown):
        raise ValueError(f"--blacklist-cooldown must be MIN,MAX seconds like 5,30, got {cooldown!r}")
    py = python or sys.executable
    run_dir = str(Path(out).resolve())
    discovery = [py, "-m", "hvd_abs.elastic.discovery", "--run-dir", run_dir,
                 "--min-np", str(min_np), "--max-np", str(max_np)]
    if hostfile:
        discovery += ["--hostfile", str(Path(hostfile).resolve())]
    cmd = ["horovodrun" if python else str(Path(py).parent / "horovodrun"),
           "--gloo", "--min-np", str(min_np), "--max-np", str(max_np),
           "--network-interface", nic, "--host-discovery-script", shlex.join(discovery)]
    if cooldown:
        # Every worker on one machine shares a host name, and Horovod blacklists a host whose
        # worker failed: without a cooldown one failure would bar the machine for good.
        cmd += ["--blacklist-cooldown-range", *cooldown.split(",")]
    return cmd + [py, "-m", "hvd_abs", "train", "--elastic", "--max-np", str(max_np), *train_args]
