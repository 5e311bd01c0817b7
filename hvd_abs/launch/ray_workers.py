"""What runs inside the Ray actors of hvd_abs.launch.ray_executor: the worker actor (_Worker),
its Horovod shutdown, and the worker and warm-up functions of `hvd-abs launch ray`
(train_worker, script_worker, warm_train_worker, warm_script_worker)."""
from __future__ import annotations

import logging
import os
import sys
from typing import Any, Callable, Mapping, Sequence

from hvd_abs.errors import Refused

# The logger of ray_executor, which this was split out of: the lines (and any filter on them)
# name the same logger as before.
log = logging.getLogger("hvd_abs.launch.ray_executor")


class ScriptRefused(RuntimeError):
    """A worker (`hvd-abs train` or a --script) exited 2 after saying why in one line
    (hvd_abs.errors.exit_2): it refused its input."""


def _refusal(exc: SystemExit) -> ScriptRefused | None:
    """The refusal a worker's SystemExit stands for: exit_2's Refused, which carries its line."""
    return ScriptRefused(exc.message) if isinstance(exc, Refused) else None


class _Worker:
    """One Horovod worker process (made a Ray actor by the executor)."""

    def warm(self, warmup: Callable[[], Any], env: Mapping[str, str]) -> bool:
        """The cold part of a join (imports, data), run before the slot is advertised, under the
        job's extra environment (cache directories, thread counts are read on first use)."""
        os.environ.update({k: str(v) for k, v in env.items()})
        warmup()
        return True

    def run(self, env: Mapping[str, str], fn: Callable[..., Any], args: Sequence[Any],
            kwargs: Mapping[str, Any]) -> tuple[int, Any]:
        # Before fn runs: Horovod's init and notification manager read these from os.environ.
        os.environ.update({k: str(v) for k, v in env.items()})
        value = fn(*args, **kwargs)
        rank = _final_rank(int(env["HOROVOD_RANK"]))
        _shut_down_horovod()
        return rank, value


def _shut_down_horovod() -> None:
    """End this worker's Horovod after its function returned: a coordinated shutdown of the
    background loops, before the executor kills the actors (a killed peer's closed connections
    made the other workers log `Horovod background loop uncaught exception: ... Connection
    reset by peer` after every successful job). The function's last collective is behind every
    worker by then, and a rank still finishing up (rank 0 writing the summary) needs no more."""
    hvd = sys.modules.get("horovod.torch")
    try:
        if hvd is not None and hvd.is_initialized():
            hvd.shutdown()
    except Exception as exc:  # noqa: BLE001 - the job is done: a failed shutdown must not fail it
        log.debug("horovod shutdown: %s", exc)


def _final_rank(start_rank: int) -> int:
    """This worker's rank at the end (ranks change across resets), else its starting rank."""
    import sys
    hvd = sys.modules.get("horovod.torch")
    try:
        if hvd is not None and hvd.is_initialized():
            return int(hvd.rank())
    except Exception:  # noqa: BLE001 - a shut-down Horovod raises ValueError; any failure: fall back
        pass
    return start_rank


def warm_train_worker(train_args: Sequence[str]) -> None:
    """The warm-up of `hvd-abs launch ray`'s workers: what a horovodrun standby does first."""
    from hvd_abs.launch.standby import get_warm

    get_warm(list(train_args))


def train_worker(train_args: Sequence[str]) -> Any:
    """The worker function of `hvd-abs launch ray`: `hvd-abs train TRAIN_ARGS` in this actor. A
    refused input (its one line said, exit 2) is raised as ScriptRefused, for the launcher."""
    from hvd_abs.elastic.worker import command

    try:
        return command.main(args=list(train_args), standalone_mode=False)
    except SystemExit as exc:
        refusal = _refusal(exc)
        if refusal is not None:
            raise refusal from None
        raise


def warm_script_worker() -> None:
    """The warm-up of `launch ray --script` workers: the imports (the data is the script's)."""
    from hvd_abs.launch.standby import get_warm

    get_warm(None)


def script_worker(script: str, cwd: str, argv: Sequence[str]) -> None:
    """The worker function of `launch ray --script`: run SCRIPT as __main__ in this actor with
    ARGV, from `cwd` when this node has it (the launcher's directory: the script's relative paths
    then mean what they meant there). A non-zero exit is this worker's failure."""
    from hvd_abs.launch.standby import run_as_main

    saved_cwd = os.getcwd()
    try:
        if os.path.isdir(cwd):
            os.chdir(cwd)
        run_as_main(script, list(argv))
    except SystemExit as exc:
        refusal = _refusal(exc)
        if refusal is not None:
            raise refusal from None
        if exc.code not in (None, 0):
            raise RuntimeError(f"{script} exited with {exc.code}") from None
    finally:
        os.chdir(saved_cwd)
