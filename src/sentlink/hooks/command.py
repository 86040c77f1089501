"""The ``command`` hook: run an executable with the event as JSON on stdin.

No shell is involved (the path and arguments are passed as they are), the environment is clean
(PATH, LANG and the event's id, type and hook name only: secrets in sentlink's environment stay
there), the working directory is ``/`` and the run is bounded by the hook's timeout, after which
the command's whole process group is killed. Exit codes follow sysexits(3) as Postfix pipe(8)
reads them: 0 done, 75 (EX_TEMPFAIL) retry later, anything else failed. A timeout is retried.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
from pathlib import Path

from sentlink import sysexits
from sentlink.config.models import HookConfig
from sentlink.errors import HookError
from sentlink.hooks import Event, Result

log = logging.getLogger("sentlink.hooks.command")

CLEAN_PATH = "/usr/local/bin:/usr/bin:/bin"
_MAX_STDERR = 400  # bytes of the command's stderr kept as the failure reason


class CommandHook:
    def __init__(
        self, name: str, path: Path, args: tuple[str, ...] = (), timeout: float = 30.0
    ) -> None:
        self._name = name
        self._argv = [str(path.absolute()), *args]
        self._timeout = timeout

    @classmethod
    def from_config(cls, config: HookConfig) -> CommandHook:
        if config.path is None:
            raise HookError("a command hook needs path")
        if not os.access(config.path, os.X_OK) or not config.path.is_file():
            raise HookError(f"{config.path} is not an executable file")
        return cls(config.name, config.path, config.args, float(config.timeout))

    @property
    def name(self) -> str:
        return self._name

    def deliver(self, event: Event) -> Result:
        env = {
            "PATH": CLEAN_PATH,
            "LANG": "C.UTF-8",
            "SENTLINK_HOOK": self._name,
            "SENTLINK_EVENT_ID": event.id,
            "SENTLINK_EVENT_TYPE": event.type,
        }
        try:
            proc = subprocess.Popen(
                self._argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=env,
                cwd="/",
                close_fds=True,
                start_new_session=True,  # its own process group: a timeout kills all of it
            )
        except OSError as exc:
            return Result.retry(f"cannot run {self._argv[0]}: {exc.strerror or exc}")
        try:
            _out, err = proc.communicate(event.body, timeout=self._timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return Result.retry(f"timed out after {self._timeout:g} s")
        except BaseException:
            _kill_group(proc)
            raise
        if proc.returncode == 0:
            return Result.done()
        reason = f"exit {proc.returncode}"
        tail = err[-_MAX_STDERR:].decode("utf-8", "replace").strip()
        if tail:
            reason += f": {tail}"
        if proc.returncode == sysexits.TEMPFAIL:
            return Result.retry(reason)
        return Result.failed(reason)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
