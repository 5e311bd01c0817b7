"""The elastic horovodrun command line for a training job (what `hvd-abs launch horovod` runs)."""
from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

from hvd_abs.elastic.discovery import WARM_TIMEOUT_S


def option_value(args: list[str], name: str) -> str | None:
    """The value of option `name` in a click command line; the last one wins, as in click."""
    value = None
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(name + "="):
            value = a.split("=", 1)[1]
    return value


def run_dir_of(train_args: list[str]) -> Path:
    """The run directory (--out) of a training command line; ValueError naming the fix if absent."""
    out = option_value(train_args, "--out")
    if not out:
        raise ValueError("elastic training needs a run directory: pass --out DIR among the train options")
    return Path(out).resolve()


def build_command(train_args: list[str], *, min_np: int, max_np: int, hostfile: str | None = None,
                  nic: str = "lo", cooldown: str = "5,30", python: str | None = None,
                  warm: bool = False, warm_timeout: float = WARM_TIMEOUT_S, script: str | None = None) -> list[str]:
    """horovodrun argv: elastic (discovery script + min/max np) over Gloo, running
    `python -m hvd_abs train --elastic --max-np N TRAIN_ARGS` (with `script`: `python SCRIPT
    --elastic --max-np N TRAIN_ARGS`). Raises ValueError naming the fix.
    warm: each worker slot starts through warm_exec, which hands it to a ready standby; growth
    waits up to warm_timeout seconds for standbys, then adds the slots cold."""
    run_dir = str(run_dir_of(train_args))
    if cooldown and not re.fullmatch(r"\d+,\d+", cooldown):
        raise ValueError(f"--blacklist-cooldown must be MIN,MAX seconds like 5,30, got {cooldown!r}")
    if cooldown and int(cooldown.split(",")[0]) > int(cooldown.split(",")[1]):
        raise ValueError(f"--blacklist-cooldown {cooldown}: MIN is above MAX; pass MIN,MAX like 5,30")
    py = python or sys.executable
    discovery = [py, "-m", "hvd_abs.elastic.discovery", "--run-dir", run_dir,
                 "--min-np", str(min_np), "--max-np", str(max_np)]
    if hostfile:
        discovery += ["--hostfile", str(Path(hostfile).resolve())]
    if warm:
        discovery += ["--warm", "--warm-timeout", f"{warm_timeout:g}"]
    cmd = ["horovodrun" if python else str(Path(py).parent / "horovodrun"),
           "--gloo", "-np", str(min_np), "--min-np", str(min_np), "--max-np", str(max_np),
           "--network-interface", nic, "--host-discovery-script", shlex.join(discovery)]
    if cooldown:
        # Horovod bars the host of a failed worker; the cooldown lets it back in later (the
        # default pool names this machine twice, so one failure never bars every worker).
        cmd += ["--blacklist-cooldown-range", *cooldown.split(",")]
    entry = [str(Path(script).resolve())] if script else ["-m", "hvd_abs", "train"]
    worker = [py, *entry, "--elastic", "--max-np", str(max_np), *train_args]
    if warm:
        from hvd_abs.elastic.standby import standby_dir

        worker = [py, "-m", "hvd_abs.elastic.warm_exec", "--standby-dir", str(standby_dir(run_dir)), "--", *worker]
    return cmd + worker


# A line horovodrun forwards from a worker: `[RANK]<stdout>:` or `[RANK]<stderr>:`, after an
# optional timestamp (horovodrun --prefix-output-with-timestamp).
_WORKER_LINE = re.compile(rb"^[^\[\n]*\[\d+\]<std(?:out|err)>:")
_TRACEBACK = b"Traceback (most recent call last):"
_WORKER_REFUSAL = re.compile(rb"^[^\[\n]*\[\d+\]<stderr>:(Error: .*)")  # hvd_abs.commands._errors.exit_2


def run_horovodrun(cmd: list[str], held: list[str] | None = None, refusals: list[str] | None = None) -> int:
    """Run horovodrun `cmd`; returns its exit code. Its stderr passes through this process line
    by line (a carriage return ends a line too, for progress bars), except horovodrun's own
    traceback: from an unprefixed `Traceback (most recent call last):` on, its unprefixed lines
    go to `held` (when given), for the caller to print or keep in a file; workers' lines
    (`[RANK]<stderr>:`) still pass. (A driver thread's traceback earlier on only delays the
    driver's later lines to the end, where the caller prints them.) Its stdout is not touched.
    horovodrun ends with that traceback whenever a worker process exited non-zero, also when the
    job itself finished (see commands/launch.py `job_outcome`). refusals: gets each worker line
    `Error: ...` (a worker refusing its input, exit 2), without the prefix."""
    import os
    import subprocess

    if held is None:
        return subprocess.call(cmd)
    with subprocess.Popen(cmd, stderr=subprocess.PIPE) as proc:
        try:
            out = sys.stderr.buffer if hasattr(sys.stderr, "buffer") else None
            holding, pending = False, b""
            fd = proc.stderr.fileno()
            while True:
                chunk = os.read(fd, 65536)
                pending += chunk
                lines = re.split(rb"(?<=[\r\n])", pending) if chunk else [pending]
                pending = lines.pop() if chunk else b""
                for line in lines:
                    if not line:
                        continue
                    refusal = _WORKER_REFUSAL.match(line)
                    if refusal and refusals is not None:
                        refusals.append(refusal.group(1).decode(errors="replace").strip())
                    holding = holding or line.startswith(_TRACEBACK)
                    if holding and not _WORKER_LINE.match(line):
                        held.append(line.decode(errors="replace"))
                        continue
                    try:
                        if out is not None:
                            out.write(line)
                            out.flush()
                        else:
                            sys.stderr.write(line.decode(errors="replace"))
                    except OSError:  # our stderr is gone (a closed pipe): the job goes on regardless
                        pass
                if not chunk:
                    break
            return proc.wait()
        except BaseException:  # as subprocess.call does (e.g. Ctrl-C): do not leave it running
            proc.kill()
            raise


def run_with_standbys(cmd: list[str], train_args: list[str], max_np: int, keep: int,
                      python: str | None = None, held: list[str] | None = None,
                      refusals: list[str] | None = None, script: bool = False) -> int:
    """Run horovodrun `cmd` while keeping `keep` warm standbys ready on this host (replacing each
    one a joining slot claims, up to max_np standbys in all); returns horovodrun's exit code.
    held, refusals: as for run_horovodrun. script: the workers run a --script (the standbys
    import ahead but do not load its data)."""
    import subprocess
    import threading

    from hvd_abs.elastic.standby import standby_dir

    py = python or sys.executable
    directory = standby_dir(run_dir_of(train_args))
    directory.mkdir(parents=True, exist_ok=True)
    standby_cmd = [py, "-m", "hvd_abs.elastic.standby", "--dir", str(directory), "--",
                   "train", "--elastic", "--max-np", str(max_np), *train_args]
    if script:  # the claimant names the script and its arguments; the standby only imports ahead
        standby_cmd = [py, "-m", "hvd_abs.elastic.standby", "--dir", str(directory), "--script", "--"]
    spawned: list[subprocess.Popen] = []
    done = threading.Event()

    def supervise() -> None:
        while not done.wait(0.5):
            claimed = {int(p.name.split(".")[0]) for p in directory.glob("*.claimed.*")}
            waiting = sum(1 for p in spawned if p.poll() is None and p.pid not in claimed)
            if waiting < keep and len(spawned) < max_np:
                spawned.append(subprocess.Popen(standby_cmd, stdin=subprocess.DEVNULL))

    thread = threading.Thread(target=supervise, daemon=True, name="hvd_abs-standbys")
    thread.start()
    try:
        return run_horovodrun(cmd, held, refusals)
    finally:
        done.set()
        thread.join()
        for p in spawned:  # unclaimed standbys have nothing left to do
            if p.poll() is None:
                p.terminate()
