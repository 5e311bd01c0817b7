"""The elastic horovodrun command line for a training job (what `hvd-abs launch horovod` runs)."""
from __future__ import annotations

import contextlib
import re
import shlex
import signal
import sys
from pathlib import Path
from typing import Any, Iterator

from hvd_abs.launch.discovery import WARM_TIMEOUT_S
from hvd_abs.launch.hosts import Ssh


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
                  warm: bool = False, warm_timeout: float = WARM_TIMEOUT_S, script: str | None = None,
                  ssh: Ssh | None = None, across_hosts: bool = False, start_timeout: int | None = None,
                  remote_standbys: tuple[str, list[str]] | None = None, reset_limit: int | None = None,
                  elastic_timeout: int | None = None) -> list[str]:
    """horovodrun argv: elastic (discovery script + min/max np) over Gloo, running
    `python -m hvd_abs train --elastic --max-np N TRAIN_ARGS` (with `script`: `python SCRIPT
    --elastic --max-np N TRAIN_ARGS`). Raises ValueError naming the fix.
    warm: each worker slot starts through warm_exec, which hands it to a ready standby; growth
    waits up to warm_timeout seconds for standbys, then adds the slots cold. remote_standbys:
    (the per-job standby folder on remote hosts, this machine's names in the pool).
    across_hosts (a pool beyond this machine) or ssh options: Horovod's launcher runs through
    hvd_abs.launch.horovodrun, which keeps `nic` and passes the ssh options on."""
    run_dir = str(run_dir_of(train_args))
    if cooldown and not re.fullmatch(r"\d+,\d+", cooldown):
        raise ValueError(f"--blacklist-cooldown must be MIN,MAX seconds like 5,30, got {cooldown!r}")
    if cooldown and int(cooldown.split(",")[0]) > int(cooldown.split(",")[1]):
        raise ValueError(f"--blacklist-cooldown {cooldown}: MIN is above MAX; pass MIN,MAX like 5,30")
    py = python or sys.executable
    discovery = [py, "-m", "hvd_abs.launch.discovery", "--run-dir", run_dir,
                 "--min-np", str(min_np), "--max-np", str(max_np)]
    if hostfile:
        discovery += ["--hostfile", str(Path(hostfile).resolve())]
    if warm:
        discovery += ["--warm", "--warm-timeout", f"{warm_timeout:g}"]
    ssh = ssh or Ssh()
    if across_hosts or ssh.options:
        options = ssh.worker_options() if across_hosts else ssh.options
        runner = [py, "-m", "hvd_abs.launch.horovodrun", *(f"--ssh-option={o}" for o in options), "--"]
    else:
        runner = ["horovodrun" if python else str(Path(py).parent / "horovodrun")]
    cmd = [*runner, "--gloo", "-np", str(min_np), "--min-np", str(min_np), "--max-np", str(max_np),
           "--network-interface", nic, "--host-discovery-script", shlex.join(discovery)]
    cmd += ssh.horovodrun_args() + (["--start-timeout", str(start_timeout)] if start_timeout else [])
    cmd += (["--elastic-timeout", str(elastic_timeout)] if elastic_timeout is not None else []) + \
        (["--reset-limit", str(reset_limit)] if reset_limit is not None else [])
    if cooldown:
        # Horovod bars the host of a failed worker; the cooldown lets it back in later (the
        # default pool names this machine twice, so one failure never bars every worker).
        cmd += ["--blacklist-cooldown-range", *cooldown.split(",")]
    entry = [str(Path(script).resolve())] if script else ["-m", "hvd_abs", "train"]
    worker = [py, *entry, "--elastic", "--max-np", str(max_np), *train_args]
    if warm:
        from hvd_abs.launch.standby import standby_dir

        remote = ["--remote-dir", remote_standbys[0], "--local-hosts", ",".join(remote_standbys[1])] \
            if remote_standbys else []
        worker = [py, "-m", "hvd_abs.launch.warm_exec", "--standby-dir", str(standby_dir(run_dir)), *remote,
                  "--", *worker]
    return cmd + worker


# A line horovodrun forwards from a worker: `[RANK]<stdout>:` or `[RANK]<stderr>:`, after an
# optional timestamp (horovodrun --prefix-output-with-timestamp).
_WORKER_LINE = re.compile(rb"^[^\[\n]*\[\d+\]<std(?:out|err)>:")
_TRACEBACK = b"Traceback (most recent call last):"
_WORKER_REFUSAL = re.compile(rb"^[^\[\n]*\[(\d+)\]<stderr>:(Error: .*)")  # hvd_abs.errors.exit_2
_PROCESS_EXIT = re.compile(rb"^Process (\d+) exit with status code (-?\d+)\.")  # horovod/runner/gloo_run.py


def _copy_stdout(stream: Any, refusals: Refusals) -> None:
    """Pass horovodrun's stdout through line by line, noting its workers' exit codes."""
    for line in iter(stream.readline, b""):
        exited = _PROCESS_EXIT.match(line)
        if exited:
            refusals.exits[int(exited.group(1))] = int(exited.group(2))
        _relay(line, sys.stdout)


def _relay(line: bytes, stream: Any) -> None:
    """Write `line` to the text stream `stream` (to its bytes buffer when it has one), flushed.
    A stream that is gone (a closed pipe) is ignored: the job goes on regardless."""
    try:
        if hasattr(stream, "buffer"):
            stream.buffer.write(line)
            stream.buffer.flush()
        else:
            stream.write(line.decode(errors="replace"))
    except OSError:
        pass


class Refusals:
    """What horovodrun says of its worker processes (by its index N of each): the `Error: ...`
    line a worker printed on refusing its input (hvd_abs.errors.exit_2, exit 2), and
    each process's exit code (`Process N exit with status code C.`, on horovodrun's stdout)."""

    def __init__(self) -> None:
        self.said: dict[int, str] = {}
        self.exits: dict[int, int] = {}

    def outcome(self) -> str | None:
        """The refusal that ended the job (its line, without `Error: `), or None: only when every
        worker process that failed exited 2 after such a line. A failure of another kind (a
        crash, a killed worker) is not hidden behind a refusal printed on the way."""
        failed = {i: c for i, c in self.exits.items() if c != 0}
        if not failed or any(c != 2 or i not in self.said for i, c in failed.items()):
            return None
        return self.said[max(failed)].removeprefix("Error: ")


class Terminated(BaseException):
    """SIGTERM or SIGHUP reached the launcher (`timeout`, `kill`, a closed terminal, a scheduler
    ending the allocation). Raised in the main thread, it unwinds through run_horovodrun and
    the standby pool, which stop horovodrun (and so its workers) and the standbys, as on Ctrl-C:
    by default Python would just die and leave the whole job running unseen."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def stop_on_termination() -> Iterator[None]:
    """Within: SIGTERM and SIGHUP raise Terminated (the previous handlers come back after)."""
    def handler(signum: int, frame: Any) -> None:
        for sig in (signal.SIGTERM, signal.SIGHUP):  # a second one must not cut the cleanup short
            signal.signal(sig, signal.SIG_IGN)
        raise Terminated(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run_horovodrun(cmd: list[str], held: list[str] | None = None, refusals: Refusals | None = None,
                   env: dict[str, str] | None = None) -> int:
    """Run horovodrun `cmd`; returns its exit code. Its stderr passes through this process line
    by line (a carriage return ends a line too, for progress bars), except horovodrun's own
    traceback: from an unprefixed `Traceback (most recent call last):` on, its unprefixed lines
    go to `held` (when given), for the caller to print or keep in a file; workers' lines
    (`[RANK]<stderr>:`) still pass. (A driver thread's traceback earlier on only delays the
    driver's later lines to the end, where the caller prints them.) Its stdout is not touched.
    horovodrun ends with that traceback whenever a worker process exited non-zero, also when the
    job itself finished (see hvd_abs/launch/outcome.py `job_outcome`). refusals: gets the workers'
    refusals and exit codes (its stdout then passes through this process line by line).
    env: horovodrun's environment (it forwards it to every worker, remote ones included)."""
    import os
    import subprocess
    import threading

    if held is None:
        return subprocess.call(cmd, env=env)
    with subprocess.Popen(cmd, stderr=subprocess.PIPE, env=env,
                          stdout=subprocess.PIPE if refusals is not None else None) as proc:
        if refusals is not None:
            copier = threading.Thread(target=_copy_stdout, args=(proc.stdout, refusals), daemon=True,
                                      name="hvd_abs-horovodrun-stdout")
            copier.start()
        try:
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
                        refusals.said[int(refusal.group(1))] = refusal.group(2).decode(errors="replace").strip()
                    holding = holding or line.startswith(_TRACEBACK)
                    if holding and not _WORKER_LINE.match(line):
                        held.append(line.decode(errors="replace"))
                        continue
                    _relay(line, sys.stderr)
                if not chunk:
                    break
            code = proc.wait()
            if refusals is not None:
                copier.join()
            return code
        except BaseException:  # as subprocess.call does (e.g. Ctrl-C): do not leave it running
            proc.kill()
            raise

